"""Training on transformers.Trainer: CE(answer) + align_weight x alignment of the latents to the teacher.

Accumulation, checkpoints, resume, logging and multi-GPU come from Trainer/Accelerate. This module
adds the latent loss, the teacher lookup, stage3's K sampling and latent metrics in the logs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from lcot.collate import Collator, drop_latents
from lcot.data import Record
from lcot.loss import AlignKind, align_loss
from lcot.teacher import read_teacher, teacher_file

METRICS_FILE = "latent_metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss: the run stops, the last good checkpoint stays."""


@dataclass(frozen=True)
class StageSpec:
    stage: str  # stage1 | stage2 | stage3
    latent_size: int  # K (stage1, stage2) or Kmax (stage3)
    align_weight: float = 1.0
    align: AlignKind = "cosine"
    latent_grad: str = "full"  # full | truncated (see lcot.patch.latent_hidden_states)
    seed: int = 0

    @property
    def thought_images(self) -> bool:
        return self.stage == "stage2"

    @property
    def uses_teacher(self) -> bool:
        return self.stage in ("stage2", "stage3")


def sample_k(seed: int, step: int, k_max: int) -> int:
    """Stage3's K for optimizer step `step`: uniform in 1..k_max, a pure function of (seed, step).

    Micro-batches of one accumulated step share K, and a resumed run draws the same sequence.
    """
    return random.Random(f"lcot-k:{seed}:{step}").randint(1, k_max)


class TrainCollate:
    """The collator plus the teacher latents [B, k_max, H] of each record (stage2, stage3)."""

    def __init__(self, collator: Collator, teacher_dir: str | Path | None, hidden_size: int,
                 dtype: torch.dtype | None = None) -> None:
        self.collator, self.hidden, self.dtype = collator, hidden_size, dtype
        self.teacher_dir = Path(teacher_dir) if teacher_dir else None

    def teacher(self, rec: Record) -> torch.Tensor:
        return read_teacher(teacher_file(self.teacher_dir, rec.idx), rec, self.hidden, self.collator.k, self.dtype)

    def __call__(self, records: list[Record]) -> dict:
        batch = self.collator(records)
        if self.teacher_dir is not None:
            batch["teacher"] = torch.stack([self.teacher(r)[: self.collator.k] for r in records])
        return batch


class LatentTrainer(Trainer):
    """Trainer whose loss is CE over labelled tokens + align_weight x (1 - cos) to the teacher."""

    def __init__(self, *args, spec: StageSpec, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self._sums: dict[str, float] = {}
        self._cos_sum: torch.Tensor | None = None
        self._count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        if spec.stage == "stage3":
            inputs = drop_latents(inputs, sample_k(spec.seed, self.state.global_step, spec.latent_size))
        out = model(input_ids=inputs["input_ids"], attention_mask_4d=inputs["attention_mask_4d"],
                    position_ids=inputs["position_ids"], pixel_values=inputs["pixel_values"],
                    image_grid_thw=inputs["image_grid_thw"], labels=inputs["labels"], latent_mode=True,
                    latent_start=inputs["latent_start"], num_latents=inputs["num_latents"], grad=spec.latent_grad,
                    return_logits=False)
        loss, ce = out.loss, out.loss.detach()
        metrics = {"ce": ce.item(), "k": float(inputs["num_latents"])}
        latents = out.latent_hidden
        if latents.shape[1]:
            metrics["latent_norm"] = latents.detach().float().norm(dim=-1).mean().item()
        if spec.uses_teacher and latents.shape[1]:
            align, cos = align_loss(latents, inputs["teacher"], spec.align)
            loss = loss + spec.align_weight * align
            metrics.update(align=align.item(), cos=cos.mean().item())
            self._add_cos(cos)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {self.state.global_step + 1}, "
                                     f"batch records {inputs['idx'].tolist()}; the last saved checkpoint is kept")
        for key, v in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + v
        self._count += 1
        return (loss, out) if return_outputs else loss

    def _add_cos(self, cos: torch.Tensor) -> None:
        """Per-position cosine summed over micro-batches; stage3's shorter K adds to the first K slots."""
        k_all = self.spec.latent_size
        padded = torch.full((k_all,), float("nan"))
        padded[: cos.shape[0]] = cos.float().cpu()
        if self._cos_sum is None:
            self._cos_sum, self._cos_n = torch.zeros(k_all), torch.zeros(k_all)
        seen = ~padded.isnan()
        self._cos_sum[seen] += padded[seen]
        self._cos_n[seen] += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._count and "loss" in logs:
            logs.update({k: v / self._count for k, v in self._sums.items()})
            row = {"step": self.state.global_step, **logs}
            if self._cos_sum is not None:
                per_pos = (self._cos_sum / self._cos_n.clamp(min=1)).tolist()
                row["cos_per_position"] = [v if n else None for v, n in zip(per_pos, self._cos_n.tolist())]
            if self.is_world_process_zero():
                with open(Path(self.args.output_dir) / METRICS_FILE, "a") as f:
                    f.write(json.dumps(row) + "\n")
            self._sums, self._cos_sum, self._count = {}, None, 0
        super().log(logs, *args, **kwargs)


class LcotConfigCallback(TrainerCallback):
    """Write lcot.json (stage, Kmax, token strings) into every checkpoint folder."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            write_lcot_config(ckpt, self.info)


def write_lcot_config(folder: Path, info: dict) -> None:
    (Path(folder) / "lcot.json").write_text(json.dumps(info, indent=2) + "\n")


def read_lcot_config(folder: str | Path) -> dict:
    path = Path(folder) / "lcot.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows}  # a resumed run logs steps again: the later row wins
    return [by_step[s] for s in sorted(by_step)]
