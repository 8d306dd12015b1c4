"""lcot: latent visual chain of thought for Qwen2.5-VL.

Layers (docs/architecture.md), each importing only from those before it:

    errors, io, config   leaves: the input error with file/line/field/hint; atomic writes, batch to device;
                 one dataclass per command -> its argparse parser
    core/        the method: tokens, mask, record, vision, collate, latent (the forward primitives and the eager
                 recurrence), graph (the same step as a CUDA graph), loss, model (latent mode, the model class)
    pipeline/    records (data), processor, load, teacher files, runs (run-folder metadata), trainer, train
                 (one stage), generate, evaluate
    toy/         the offline tiny model and the bundled tasks (synthetic, hops)
    lab/         what the notebooks measure and draw: analysis, probe, plots, widgets, notebook helpers
    main, precompute_teacher_latents, experiment, demo: the commands
"""

__version__ = "0.1.0"
