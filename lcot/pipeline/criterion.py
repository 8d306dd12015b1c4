"""Training to a criterion: a stage stops once a held-out check passes, not only at a step count.

Every `every` optimizer steps the model answers held-out records (the last `--criterion_records` of the training
JSONL, left out of training) with and without thought images, in the stage's own setting (a visual-CoT warm-up's
answer sees them; stage2's sees them only through the latents). The stage stops when its accuracy with thought
images reaches `accuracy` and its benefit (with minus without) reaches `benefit`; `--max_steps` is the cap. What
each check found, and the step the criterion was met at (None: never, within the cap), go to lcot.json.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from lcot.core.record import Record


class CriterionStop(TrainerCallback):
    def __init__(self, processor, records: Sequence[Record], num_latents: int, every: int, accuracy: float,
                 benefit: float, visual_cot: bool, visibility: str, feed: str, batch_size: int = 32) -> None:
        self.processor, self.records, self.k = processor, list(records), num_latents
        self.every, self.accuracy, self.benefit = every, accuracy, benefit
        self.visual_cot, self.visibility, self.feed, self.batch_size = visual_cot, visibility, feed, batch_size
        self.checks: list[dict] = []
        self.met_at: int | None = None

    def check(self, model) -> dict:
        """Accuracy with and without thought images on the held-out records, in the stage's setting."""
        from lcot.pipeline.evaluate import evaluate

        was_training = model.training
        model.eval()
        with torch.no_grad():
            acc = {t: evaluate(model, self.processor, self.records, [self.k], thought_images=t,
                               visual_cot=self.visual_cot and t, visibility=self.visibility, feed=self.feed,
                               batch_size=self.batch_size, max_new_tokens=8, progress=False)["accuracy"][self.k]
                   for t in (True, False)}
        model.train(was_training)
        return {"with": acc[True], "without": acc[False], "benefit": acc[True] - acc[False]}

    def passes(self, found: dict) -> bool:
        return found["with"] >= self.accuracy and found["benefit"] >= self.benefit

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.met_at is not None or state.global_step % self.every:
            return
        found = {"step": state.global_step, **self.check(model)}
        self.checks.append(found)
        if state.is_world_process_zero:
            print(f"lcot: check at step {state.global_step}: {found['with']:.3f} with thought images, "
                  f"{found['without']:.3f} without (criterion: >= {self.accuracy} with, benefit >= {self.benefit})"
                  + (": met, stopping" if self.passes(found) else ""), flush=True)
        if self.passes(found):
            self.met_at = state.global_step
            control.should_training_stop = True

    def summary(self, steps: int) -> dict:
        """What lcot.json records: the criterion, the step it was met at (None: not within the cap), the steps run."""
        return {"accuracy": self.accuracy, "benefit": self.benefit, "every": self.every,
                "records": len(self.records), "met_at": self.met_at, "steps": steps, "checks": self.checks}
