"""Records, teacher files, run folders, the trainer and the stage runner, generation and evaluation."""
