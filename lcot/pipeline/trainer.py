"""Training on transformers.Trainer: CE(answer) + align_weight x alignment of the latents to the teacher.

Accumulation, checkpoints, resume, logging and multi-GPU come from Trainer/Accelerate. This module
adds the latent loss, the teacher lookup, stage3's K sampling and latent metrics in the logs, and
two safeguards: checkpoints are written to a hidden staging folder and renamed when complete (so a
kill at any moment never leaves a partial `checkpoint-N` for resume to pick), and a NaN/inf loss or
gradient norm stops the run before the optimizer step, naming the step and the batch's records.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import align_special_tokens

from lcot.config import SpeedConfig
from lcot.console import progress, transformers_errors_only
from lcot.core.collate import Collator, drop_latents
from lcot.core.loss import ALIGNS, align_loss, centred_cosines, state_loss
from lcot.core.mask import VISIBILITY
from lcot.core.model import BATCH_KEYS, FEEDS, LatentQwen2_5_VL
from lcot.core.record import Record
from lcot.core.tokens import IGNORE
from lcot.errors import DISK_FULL, writing
from lcot.pipeline.runs import METRICS_FILE, checkpoints, last_checkpoint, write_lcot_config
from lcot.pipeline.teacher import prefix_lengths, processor_layout, read_teacher, teacher_file

STAGING_PREFIX = ".tmp-"  # a checkpoint being written: .tmp-checkpoint-N, renamed to checkpoint-N when complete
TRASH_PREFIX = ".old-"  # a checkpoint being deleted (renamed first, so no half-deleted checkpoint-N stays)


class NonFiniteLossError(RuntimeError):
    """A NaN or inf loss: the run stops, the last good checkpoint stays."""


LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
STAGES = ("stage1", "vcot", "stage2", "stage3")
# per latent position, logged as NAME_per_position (latent_metrics.jsonl) and NAME_pos1..K (TensorBoard): the plain
# cosine to the teacher; the centred cosine (the teacher's mean latent per position subtracted from both) to the
# record's own teacher and to another record's. ccos - ccos_shuffled is what the latent holds of its own record.
POSITION_METRICS = ("cos", "ccos", "ccos_shuffled")


def _f(default, help: str, **meta):
    """A field with HfArgumentParser's metadata (help, choices, aliases, required, nargs/const)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig(SpeedConfig, TrainingArguments):
    """One training stage: transformers' TrainingArguments, the seed's flags (`--epochs`, `--bsz`, `--grad_accum_steps`
    and `--latent_size` are the seed's spellings of fields below), lcot's method flags and the shared speed flags
    (lcot.config.SpeedConfig). This object is the Trainer's `args`. `SAVED` lists what lcot.json records, `RESUME`
    what a resumed run must share with its checkpoint. Notebooks build it directly (`lcot.pipeline.train.run_stage`)."""

    SAVED: ClassVar[tuple[str, ...]] = ("stage", "teacher_latent_dir", "num_latents", "latent_feed", "align_weight",
                                        "align", "latent_grad", "latent_curriculum", "seed", "lora",
                                        "thought_visibility", "teacher_forcing", "state_field", "state_weight")
    RESUME: ClassVar[tuple[str, ...]] = ("stage", "num_latents", "latent_feed", "align", "latent_grad",
                                         "latent_curriculum", "seed", "lora")
    FLAGS: ClassVar[dict[str, str]] = {"num_latents": "--latent_size", "num_train_epochs": "--epochs",
                                       "per_device_train_batch_size": "--bsz",
                                       "gradient_accumulation_steps": "--grad_accum_steps"}

    stage: str = _f(None, "stage1: format warm-up without images; vcot: visual-CoT warm-up, question + thought images "
                    "visible to every later token (the answer too), CE only (for models trained from scratch); stage2: "
                    "question + thought images, 4D mask, CE + align; stage3: no thought images, K sampled in "
                    "1..latent_size each step, CE + align", choices=STAGES, required=True)
    model_name_or_path: str = _f(None, "local checkpoint folder (a real Qwen2.5-VL, the tiny model, or the previous "
                                 "stage's output); never written to", required=True)
    train_jsonl: str = _f(None, "training records (JSONL, see README)", required=True)
    output_dir: str = _f(None, "where checkpoints and the final model go", required=True)
    teacher_latent_dir: str | None = _f(None, "teacher latents from lcot.precompute_teacher_latents (stage2, stage3; "
                                        "not needed with --align_weight 0)")
    num_latents: int = _f(32, "K latent slots (stage1, vcot, stage2; 0 = no latent slots, the answer right after the "
                          "question) or Kmax (stage3)", aliases=["--latent_size"])
    latent_feed: str = _f("continuous", "continuous: each latent slot's input is the previous position's last hidden "
                          "state (the method); pause: the control, every slot's input is one learned embedding and "
                          "nothing is fed back", choices=FEEDS)
    thought_visibility: str = _f("all", "which thought image each latent slot sees (vcot, stage2; stage3 checks its "
                                 "teacher's): all: every one; stepwise: slot j sees image j only (slots past the "
                                 "last image: the last); cumulative: images 1..j", choices=VISIBILITY)
    align_weight: float = _f(1.0, "weight of the alignment loss (stage2, stage3)")
    align: str = _f("cosine", "alignment: 1 - cosine along hidden, MSE, or centered: 1 - cosine after subtracting the "
                    "teacher's mean latent per position (over the training records) from both", choices=ALIGNS)
    latent_grad: str = _f("full", "full: backprop through the whole latent chain (a recurrence with gradients); "
                          "adjoint: the same gradient (without dropout), from the truncated pass and K-1 "
                          "vector-Jacobian products over the slots (works with --gradient_checkpointing, not with "
                          "FSDP); truncated: the chain runs without gradients, then one parallel pass with "
                          "gradients; bptt:M: truncated plus M more parallel passes, the gradient flows back "
                          "through M feedback links (bptt:K = full)")
    latent_curriculum: bool = _f(False, "stage3 only: a curriculum over K after Coconut's stages; the optimizer steps "
                                 "are cut into latent_size equal phases and phase c samples K in 1..c")
    teacher_forcing: float = _f(0.0, "stage3: scheduled sampling; latent slot j (j >= 2) is fed the teacher's latent "
                                "j-1 instead of its own previous output with this probability, annealed linearly to "
                                "0 over the steps (needs --latent_grad truncated or bptt:M)")
    state_field: str | None = _f(None, "stage2, stage3: the JSONL field listing the state after each step (e.g. "
                                 "states); with --state_weight, latent slot j learns to predict state j's first "
                                 "token (slots past the last step: the last state)")
    state_weight: float = _f(0.0, "weight of that per-step CE (needs --state_field)")
    criterion_every: int = _f(0, "vcot, stage2: check the model every N optimizer steps on held-out records and "
                              "stop once the criterion is met (--max_steps is then the cap; 0: no check)")
    criterion_records: int = _f(100, "the last N records of --train_jsonl, held out of training for the check")
    criterion_accuracy: float = _f(0.9, "the check passes at this accuracy with thought images ...")
    criterion_benefit: float = _f(0.3, "... and this thought-image benefit (accuracy with minus without)")
    question_images: bool = _f(False, "stage1 only: include the question images (otherwise stage1 sees no image)")
    skip_missing_thought: bool = _f(False, "stage2/stage3: skip records without thought images (they have no teacher "
                                    "latents) and say how many, instead of stopping")
    freeze_vision: bool = _f(False, "freeze the vision tower (frozen anyway in stage1 without --question_images)")
    lora: bool = _f(False, "train LoRA adapters (peft) on the language model; merged at the end")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: str = _f(LORA_TARGETS, "comma-separated module names in the language model")
    max_pixels: int | None = _f(None, "image processor max_pixels (None: the checkpoint's)")
    preprocess: bool = _f(False, "read and process every record's images (and teacher latents) once, before "
                          "training, and keep them in memory (exact uint8 pixel codes): faster for small images, "
                          "memory-hungry for large datasets")
    compile: bool = _f(False, "torch.compile the language model's passes without a KV cache (the pass with "
                       "gradients): fewer launches for small models, a one-off compile at the start")
    graph_pass: bool = _f(False, "run the pass with gradients (--latent_grad truncated or bptt:M, the pause feed) as "
                          "CUDA graphs of its forward and backward, one per batch shape: for small models, whose "
                          "step is bound by launching kernels; no effect on a CPU")
    attn_implementation: str = _f("sdpa", "attention kernel of the language model (the 4D mask works with both)",
                                  choices=("sdpa", "eager"))
    overwrite_output_dir: bool = _f(False, "allow a non-empty --output_dir (its content is replaced)")
    save_final_checkpoint: bool = _f(False, "also write checkpoint-N (with optimizer state) at the last step; by "
                                     "default only the final model is written there, the --save_steps checkpoints "
                                     "before it stay for resume")
    verbose: bool = _f(False, "print everything transformers prints (its dict of every log, its own bars); without "
                       "it: a header, one bar and a loss line about every tenth of the run", aliases=["-v"])
    # TrainingArguments' own fields, with the seed's spelling or lcot's default
    num_train_epochs: float = _f(1.0, "passes over the training JSONL", aliases=["--epochs"])
    per_device_train_batch_size: int = _f(1, "records per device per micro-batch (padded; K is shared in a batch)",
                                          aliases=["--bsz"])
    gradient_accumulation_steps: int = _f(8, "micro-batches per optimizer step", aliases=["--grad_accum_steps"])
    learning_rate: float = _f(1e-5, "peak learning rate (AdamW)")
    warmup_steps: float = _f(0.03, "learning-rate warm-up: optimizer steps, or a fraction of them when below 1")
    logging_steps: float = _f(10, "log CE, alignment and the per-position metrics every N optimizer steps")
    save_total_limit: int | None = _f(2, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _f(None, "resume from a checkpoint folder, or from the last one in "
                                            "--output_dir when given without a value", nargs="?", const="last")
    remove_unused_columns: bool = _f(False, "(lcot's batches are built by its collator: keep every column)")
    logging_nan_inf_filter: bool = _f(False, "(lcot checks every loss itself, at the optimizer step)")

    def __post_init__(self) -> None:
        if self.data_seed is None:
            self.data_seed = self.seed
        if self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.dataloader_persistent_workers = self.dataloader_num_workers > 0
        if not torch.cuda.is_available():
            self.use_cpu = True
        if self.accelerator_config is None:
            # no host-device sync inside a step: batches are copied from pinned memory without blocking (on a CPU
            # there is no copy, and Trainer would warn that non_blocking goes without pinned memory)
            self.accelerator_config = {"non_blocking": torch.cuda.is_available()}
        super().__post_init__()

    @property
    def thought_images(self) -> bool:
        return self.stage in ("vcot", "stage2")

    @property
    def visual_cot(self) -> bool:
        """The visual-CoT warm-up: the answer sees the thought images too."""
        return self.stage == "vcot"

    @property
    def uses_teacher(self) -> bool:
        return self.stage in ("stage2", "stage3") and self.align_weight > 0


def teacher_forced(seed: int, step: int, total_steps: int, p: float, rows: int, k: int) -> torch.Tensor:
    """(rows, k) bool: which latent slots take the teacher's previous latent at optimizer step `step` (each slot
    j >= 2 with probability p * (1 - step / total_steps); slot 1's input, <abs_vis_token>'s output, never). A pure
    function of its arguments, as sample_k is."""
    gen = torch.Generator().manual_seed(random.Random(f"lcot-force:{seed}:{step}").getrandbits(63))
    rate = p * max(0.0, 1.0 - step / max(total_steps, 1))
    out = torch.rand(rows, k, generator=gen) < rate
    out[:, 0] = False
    return out


def sample_k(seed: int, step: int, k_max: int, total_steps: int | None = None) -> int:
    """Stage3's K for optimizer step `step`: uniform in 1..k_max, a pure function of (seed, step).

    Micro-batches of one accumulated step share K, and a resumed run draws the same sequence.
    total_steps (--latent_curriculum, after Coconut's stages): the steps are cut into k_max equal phases and
    phase c (1-based) draws K uniformly from 1..c, so each latent is trained on the ones before it once they
    have been learnt.
    """
    hi = k_max if not total_steps else min(k_max, 1 + step * k_max // total_steps)
    return random.Random(f"lcot-k:{seed}:{step}").randint(1, hi)


class TrainCollate:
    """The collator plus the teacher latents [B, K, H] of each record (stage2, stage3).

    cache=True keeps the teacher latents in memory after the first read (`prepare` reads them all up front,
    together with the collator's own cache).
    Each file must match this run's token layout (`teacher.processor_layout`): the image processor's
    settings always; the record's length up to <abs_vis_token> (`prefix_len`) only where this collator
    builds the teacher's prefix (question and thought images shown: stage2). stage3 shows no thought images,
    so its prefix is shorter than the teacher's by design and only the processor settings compare (they fix
    the question-image tokens, the part the two sequences share).
    """

    def __init__(self, collator: Collator, teacher_dir: str | Path | None, hidden_size: int,
                 dtype: torch.dtype | None = None, cache: bool = False, visibility: str | None = None,
                 state_field: str | None = None) -> None:
        self.state_field = state_field
        self.collator, self.hidden, self.dtype = collator, hidden_size, dtype
        self.visibility = visibility or collator.visibility  # the teacher files' (stage3 shows no thought images)
        self.teacher_dir = Path(teacher_dir) if teacher_dir else None
        self._teachers: dict[int, torch.Tensor] | None = {} if cache else None
        self.layout = processor_layout(collator.processor)
        self.same_prefix = collator.thought_images and collator.question_images
        self._prefix_checked: set[int] = set()  # cached records whose prefix length was compared

    def teacher(self, rec: Record, prefix_len: int | None = None) -> torch.Tensor:
        """The record's teacher latents [K, H]; prefix_len (given where comparable) is checked once per record."""
        cached = self._teachers is not None and rec.idx in self._teachers
        if cached and (prefix_len is None or rec.idx in self._prefix_checked):
            return self._teachers[rec.idx]
        k = self.collator.num_latents
        layout = {**self.layout, "prefix_len": prefix_len} if prefix_len is not None else self.layout
        lat = read_teacher(teacher_file(self.teacher_dir, rec.idx), rec, self.hidden, k, self.dtype,
                           layout=layout, visibility=self.visibility)[:k].clone()
        if self._teachers is not None:
            self._teachers[rec.idx] = lat
            if prefix_len is not None:
                self._prefix_checked.add(rec.idx)
        return lat

    def _prefix_len(self, rec: Record) -> int | None:
        """The record's prefix length where comparable and known without encoding it (the collator's cache)."""
        cached = self.collator.cache.get(rec.idx) if self.collator.cache is not None else None
        return len(cached.prefix) if self.same_prefix and cached is not None else None

    def check_teachers(self, records: list[Record]) -> None:
        """Every record has a valid teacher file of this run's layout (read and checked once; kept when
        caching). Uncached, each batch checks its prefix lengths again as it reads the files."""
        if self.teacher_dir is not None:
            for rec in records:
                self.teacher(rec, self._prefix_len(rec))

    def prepare(self, records: list[Record]) -> None:
        self.collator.prepare(records)
        self.check_teachers(records)

    def teacher_mean(self, records: list[Record]) -> torch.Tensor:
        """(K, H) mean teacher latent per position over `records`, in float32 (for centred alignment)."""
        total = None
        for rec in records:
            lat = self.teacher(rec).float()
            total = lat if total is None else total + lat
        return total / len(records)

    def __call__(self, records: list[Record]) -> dict:
        batch = self.collator(records)
        if self.teacher_dir is not None:
            prefixes = prefix_lengths(batch) if self.same_prefix else [None] * len(records)
            batch["teacher"] = torch.stack([self.teacher(r, n) for r, n in zip(records, prefixes)])
        if self.state_field:
            batch["state_targets"] = torch.tensor([self.state_targets(r) for r in records])
        return batch

    def state_targets(self, rec: Record) -> list[int]:
        """The first token of the state after each of the K steps (the last state past the last step)."""
        states = rec.extra.get(self.state_field) or []
        tok = self.collator.tokenizer
        ids = [tok(str(s), add_special_tokens=False)["input_ids"][0] for s in states]
        k = self.collator.num_latents
        return (ids + ids[-1:] * k)[:k] if ids else [IGNORE] * k


class LatentTrainer(Trainer):
    """Trainer whose loss is CE over labelled tokens + align_weight x alignment to the teacher; `args` is a
    TrainConfig."""

    args: TrainConfig

    def __init__(self, *args, teacher_mean: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = self.config = self.args
        self.teacher_mean = teacher_mean
        if not config.save_final_checkpoint:
            self.add_callback(NoFinalCheckpoint)
        if not config.verbose:  # Trainer's bar, which prints every log as a raw dict, gives way to ours
            for cb in [cb for cb in self.callback_handler.callbacks if _prints_logs(cb)]:
                self.remove_callback(cb)
            records = len(self.train_dataset) if isinstance(self.train_dataset, Sized) else None
            self.add_callback(ConsoleCallback(config, records))
        self._sums: dict[str, float] = {}
        self._pos_sum: dict[str, torch.Tensor] = {}  # per-position metrics summed since the last log
        self._pos_n: dict[str, torch.Tensor] = {}
        self._count = 0
        self._pending: list[tuple[list[str], torch.Tensor, list[int], float]] = []  # metrics not read back yet

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.config
        records = list(inputs["idx"])
        if cfg.stage == "stage3":
            total = self.state.max_steps if cfg.latent_curriculum else None
            inputs = drop_latents(inputs, sample_k(cfg.seed, self.state.global_step, cfg.num_latents, total))
            if cfg.teacher_forcing > 0:
                teacher, k = inputs["teacher"], inputs["num_latents"]
                forced = teacher_forced(cfg.seed, self.state.global_step, self.state.max_steps, cfg.teacher_forcing,
                                        len(records), k)
                inputs = dict(inputs, forced=forced.to(teacher.device),
                              forced_inputs=torch.cat([teacher[:, :1], teacher[:, :k - 1]], 1))  # slot j <- t_{j-1}
        out = model(**{k: inputs.get(k) for k in BATCH_KEYS}, labels=inputs["labels"], latent_mode=True,
                    grad=cfg.latent_grad, feed=cfg.latent_feed, return_logits=False)
        loss = out.loss
        metrics = {"ce": out.loss.detach()}
        latents, per_position = out.latent_hidden, []
        if latents.shape[1]:
            metrics["latent_norm"] = latents.detach().float().norm(dim=-1).mean()
        if cfg.uses_teacher and latents.shape[1]:
            align, cos = align_loss(latents, inputs["teacher"], cfg.align, self.teacher_mean)
            loss = loss + cfg.align_weight * align
            metrics.update(align=align.detach(), cos=cos.mean())
            per_position = [cos]
            if self.teacher_mean is not None:
                per_position += centred_cosines(latents, inputs["teacher"], self.teacher_mean)
        if cfg.state_weight and latents.shape[1]:
            states = state_loss(self.accelerator.unwrap_model(model).lm_head, latents, inputs["state_targets"])
            loss = loss + cfg.state_weight * states
            metrics["state_ce"] = states.detach()
        values = torch.cat([torch.stack([v.float() for v in metrics.values()] + [loss.detach().float()]),
                            *[v.detach().float() for v in per_position]])
        # read back at the optimizer step (`_read_metrics`): a copy to the host here would stall the GPU
        self._pending.append((list(metrics), values, records, float(inputs["num_latents"])))
        return (loss, out) if return_outputs else loss

    def train(self, *args, **kwargs):
        # Trainer aligns the model's and generation config's PAD/BOS/EOS ids with the tokenizer's and warns that
        # it did so, at every stage: expected here (lcot's tokenizer defines them; Qwen's generation config and
        # the tiny model's config differ), so the same alignment is done first, without the warning.
        if isinstance(self.processing_class, (PreTrainedTokenizerBase, ProcessorMixin)):
            with transformers_errors_only():
                align_special_tokens(self.model, self.processing_class)
        return super().train(*args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer calls this once per optimizer step, after clipping and before optimizer.step():
        a NaN/inf gradient norm stops the run here, so no checkpoint ever holds NaN weights."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        records = [r for _, _, batch_records, _ in self._pending for r in batch_records]  # this step's micro-batches
        value = self._read_metrics(grad_norm)
        # gradients are all-reduced, so under DDP/FSDP every rank sees the same norm and stops here together
        if not (self.args.fp16 or math.isfinite(value)):  # fp16's loss scaler skips such steps itself
            raise self._non_finite([("gradient norm", value, records, self._rank_of())])
        return grad_norm

    def _read_metrics(self, grad_norm: torch.Tensor | float | None = None) -> float:
        """The micro-batches' metrics and the gradient norm in one device-to-host copy (one sync an optimizer
        step); a NaN/inf loss stops the run, naming its micro-batch. Returns the gradient norm (0.0 for None).

        Several processes: one small all-gather of a "my loss is not finite" flag per optimizer step, so that
        every rank stops at the same step, with the same message (the ranks, their records), instead of the
        healthy ranks waiting in the next collective until the NCCL timeout.
        """
        pending, self._pending = self._pending, []
        tensor_norm = isinstance(grad_norm, torch.Tensor)
        if tensor_norm and hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, every rank calls this here
            grad_norm = grad_norm.full_tensor()
        parts = [v for _, v, _, _ in pending] + ([grad_norm.detach().float().reshape(1)] if tensor_norm else [])
        world = self.accelerator.num_processes
        if world > 1:
            parts.append(self.accelerator.gather(_any_non_finite(pending, self.accelerator.device)))
        flat = torch.cat([p.to(parts[0].device) for p in parts]).tolist() if parts else []
        if world > 1 and any(flat[-world:]):
            mine = [(what, value, records, self._rank_of()) for what, value, records in _non_finite_rows(pending, flat)]
            from accelerate.utils import gather_object  # collective: every rank saw the same flags

            raise self._non_finite(gather_object(mine[:1]))
        at = 0
        for keys, v, records, k in pending:
            row, at = flat[at:at + v.numel()], at + v.numel()
            n = len(keys)
            if not math.isfinite(row[n]):
                raise self._non_finite([("loss", row[n], records, self._rank_of())])
            if len(row) > n + 1:
                self._add_per_position(row[n + 1:], int(k))
            for key, x in zip([*keys, "k"], row[:n] + [k]):
                self._sums[key] = self._sums.get(key, 0.0) + x
            self._count += 1
        if tensor_norm:
            return flat[at]
        return float(grad_norm) if grad_norm is not None else 0.0

    def _rank_of(self) -> tuple[int, int] | None:
        n = self.accelerator.num_processes
        return (self.accelerator.process_index, n) if n > 1 else None

    def _non_finite(self, bad: list[tuple[str, float, list[int], tuple[int, int] | None]]) -> NonFiniteLossError:
        """bad: (what, value, records, (rank, world) or None) per failing process."""
        out, last = self.args.output_dir, last_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else f"no checkpoint was saved yet in {out}"
        where = "; ".join(f"{what} is {value} at step {self.state.global_step + 1}"
                          + (f" on rank {rank[0]} of {rank[1]}" if rank else "") + f", batch records {records}"
                          for what, value, records, rank in bad)
        return NonFiniteLossError(
            f"{where} (record idx = 0-based position among the non-blank lines of the JSONL); {kept}. "
            "Try a lower --learning_rate, or check those records")

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed when complete.

        A kill mid-save leaves only `.tmp-checkpoint-N` (ignored by resume, removed at the next save; on a full
        disk it is removed at once and the error names `checkpoint-N`);
        `checkpoint-N` appears, whole, by one rename. lcot.json is written inside before the rename.
        Old checkpoints beyond --save_total_limit are renamed away before they are deleted.
        """
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        main = self.args.should_save
        if main:
            _remove_leftovers(run_dir)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes staging/checkpoint-N
        failed = None
        try:
            with writing(run_dir / name):
                super()._save_checkpoint(model, trial)
        except Exception as err:
            failed = err
        finally:
            del self._get_output_dir
        # every process wrote its part (e.g. its RNG state), or all of them stop here with the first failure
        try:
            all_ranks_raise(self.accelerator, failed)
        except OSError as err:
            if main and err.errno in DISK_FULL:  # the partial checkpoint only takes space the rerun needs
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if main:
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, LcotConfigCallback):
                    write_lcot_config(staging / name, cb.info)
            final = run_dir / name
            if final.exists():  # e.g. resumed from an earlier checkpoint: the newer save replaces it
                final.rename(run_dir / f"{TRASH_PREFIX}{name}")
            os.replace(staging / name, final)
            _remove_leftovers(run_dir)
            _rotate(run_dir, self.args.save_total_limit, keep=final)
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load checkpoint weights through from_pretrained.

        transformers 5.17 saves Qwen2.5-VL weights under the stock checkpoint names (model.layers.*) and
        Trainer reloads them with a non-strict load_state_dict, which silently loads nothing. from_pretrained
        applies the name mapping; the strict load then proves every tensor arrived.
        """
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
        if not isinstance(model, LatentQwen2_5_VL) or self.is_fsdp_enabled or not has_weights:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(folder, dtype=model.dtype, local_files_only=True)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _add_per_position(self, values: list[float], k: int) -> None:
        """Per-position metrics (POSITION_METRICS, K values each) summed over micro-batches; stage3's shorter K
        adds to the first K slots; NaN (a shuffled teacher in a batch of one) is left out."""
        for name, at in zip(POSITION_METRICS, range(0, len(values), k)):
            if name not in self._pos_sum:
                self._pos_sum[name] = torch.zeros(self.config.num_latents)
                self._pos_n[name] = torch.zeros(self.config.num_latents)
            v = torch.tensor(values[at:at + k])
            self._pos_sum[name][:k] += v.nan_to_num()
            self._pos_n[name][:k] += ~v.isnan()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._pending:
            self._read_metrics()
        if self._count and "loss" in logs:
            logs.update({k: v / self._count for k, v in self._sums.items()})
            row = {"step": self.state.global_step, **logs}
            for name, total in self._pos_sum.items():
                mean, n = (total / self._pos_n[name].clamp(min=1)).tolist(), self._pos_n[name].tolist()
                row[f"{name}_per_position"] = [v if c else None for v, c in zip(mean, n)]
            if self.is_world_process_zero():
                path = Path(self.args.output_dir) / METRICS_FILE
                with open(path, "ab+") as f:
                    torn = False  # the last line was cut short by a kill: start on a new line
                    if f.seek(0, os.SEEK_END) > 0:
                        f.seek(-1, os.SEEK_END)
                        torn = f.read(1) != b"\n"
                    f.write((("\n" if torn else "") + json.dumps(row) + "\n").encode())
            for name in self._pos_sum:  # scalars for Trainer's integrations (tensorboard, wandb): cos_pos1..K, ...
                logs.update({f"{name}_pos{j + 1}": v for j, v in enumerate(row[f"{name}_per_position"])
                             if v is not None})
            self._sums, self._pos_sum, self._pos_n, self._count = {}, {}, {}, 0
        super().log(logs, *args, **kwargs)


def all_ranks_raise(accelerator, err: BaseException | None) -> None:
    """Instead of a barrier after work that can fail on some processes only (a save on a full disk): every
    process learns whether any failed, and then all raise, so none waits in the next collective until the
    timeout. A process that failed raises its own error; the others a copy of the first (a full disk keeps
    its errno and file name, so the CLI prints the same line and exits with the same code everywhere)."""
    if accelerator.num_processes == 1:
        if err is not None:
            raise err
        return
    flags = accelerator.gather(torch.tensor([float(err is not None)], device=accelerator.device))
    if not flags.any().item():  # one host read at a save
        return
    from accelerate.utils import gather_object  # collective: every process saw the same flags

    about = None if err is None else (accelerator.process_index, getattr(err, "errno", None),
                                      getattr(err, "filename", None), f"{type(err).__name__}: {err}")
    first = next(a for a in gather_object([about]) if a is not None)
    if err is not None:
        raise err
    rank, code, filename, text = first
    if code is not None:
        raise OSError(code, os.strerror(code), filename)
    raise RuntimeError(f"process {rank} failed: {text}")


def _any_non_finite(pending: list, device: torch.device) -> torch.Tensor:
    """[1] float on the device: 1.0 when a pending micro-batch's loss is NaN/inf (no host sync)."""
    flags = [~torch.isfinite(v[len(keys)]) for keys, v, _, _ in pending]
    return torch.stack(flags).any().float().reshape(1).to(device) if flags else torch.zeros(1, device=device)


def _non_finite_rows(pending: list, flat: list[float]) -> list[tuple[str, float, list[int]]]:
    """The pending micro-batches whose loss (read back in `flat`) is NaN/inf: (what, value, records)."""
    bad, at = [], 0
    for keys, v, records, _ in pending:
        value = flat[at + len(keys)]
        if not math.isfinite(value):
            bad.append(("loss", value, records))
        at += v.numel()
    return bad


def _prints_logs(cb: TrainerCallback) -> bool:
    """Trainer's bar or printer, which print every log as a dict (NotebookProgressCallback in a notebook)."""
    return isinstance(cb, (PrinterCallback, ProgressCallback)) or type(cb).__name__ == "NotebookProgressCallback"


class NoFinalCheckpoint(TrainerCallback):
    """No checkpoint-N at the last step (Trainer saves there whatever --save_steps says): the final model is
    written to the output folder anyway, and the checkpoint's optimizer state would double its size on disk.
    --save_final_checkpoint keeps Trainer's save."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False


class ConsoleCallback(TrainerCallback):
    """What a stage prints (main process): a header line, one labelled bar, a loss line about every tenth of
    the run (at logging steps) and a closing line. Informational lines go to stdout, the bar to stderr; into a
    pipe or a file there is no bar (the loss lines, `step i/N`, show the progress)."""

    LINES = 10

    def __init__(self, config: TrainConfig, records: int | None) -> None:
        self.config, self.records = config, records
        self.bar, self.every = None, 1

    def header(self, args, state) -> str:
        cfg, per_step = self.config, args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        k = f"K=1..{cfg.num_latents}" if cfg.stage == "stage3" else f"K={cfg.num_latents}"
        if not self.records:  # a dataset without a length
            return f"{cfg.stage} · {k} · {state.max_steps} steps of {per_step} records -> {args.output_dir}"
        epochs = state.max_steps * per_step / self.records
        return (f"{cfg.stage} · {self.records} records · {k} · {state.max_steps} steps of {per_step} records "
                f"({epochs:.3g} epochs) -> {args.output_dir}")

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        print(self.header(args, state), flush=True)
        logs_per_line = math.ceil(state.max_steps / self.LINES / max(state.logging_steps, 1))
        self.every = max(logs_per_line, 1) * max(state.logging_steps, 1)
        self.bar = progress(total=state.max_steps, desc=self.config.stage, unit="step", dynamic_ncols=True,
                            in_pipe=False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None and not self.bar.disable:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "train_runtime" in logs:
            self.bar.write(f"{self.config.stage}: {state.global_step} steps in {logs['train_runtime']:.0f} s, "
                           f"mean loss {logs.get('train_loss', float('nan')):.4g}", file=sys.stdout)
        elif "loss" in logs and (state.global_step % self.every == 0 or state.global_step >= state.max_steps):
            line = loss_line(logs, state.global_step, state.max_steps, k=self.config.stage == "stage3")
            self.bar.write(line, file=sys.stdout)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def loss_line(logs: dict, step: int, max_steps: int, k: bool = False) -> str:
    """`step 40/96  ce 1.23  align 0.004  cos 0.996` (k: and the mean K, stage3's)."""
    parts = [f"step {step}/{max_steps}"]
    for key, fmt in (("ce", ".4g"), ("align", ".3g"), ("cos", ".3f"), ("loss", ".4g")):
        if key in logs and not (key == "loss" and "ce" in logs):
            parts.append(f"{key} {logs[key]:{fmt}}")
    if k and "k" in logs:
        parts.append(f"K {logs['k']:.2g}")
    return "  ".join(parts)


def _remove_leftovers(run_dir: Path) -> None:
    """Staging folders of saves that were killed, and checkpoints whose deletion was interrupted."""
    for p in run_dir.glob(".*checkpoint-*"):
        if p.is_dir() and p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def _rotate(run_dir: Path, limit: int | None, keep: Path) -> None:
    """Keep the newest `limit` checkpoints (and always `keep`); rename before deleting."""
    if not limit or limit <= 0:
        return
    found = checkpoints(run_dir)
    for old in found[: max(len(found) - limit, 0)]:
        if old != keep:
            trash = old.with_name(f"{TRASH_PREFIX}{old.name}")
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


class LcotConfigCallback(TrainerCallback):
    """Write lcot.json (stage, Kmax, token strings) into every checkpoint folder."""

    def __init__(self, info: dict) -> None:
        self.info = info

    def on_save(self, args, state, control, **kwargs):
        """LatentTrainer writes lcot.json before its atomic rename; this covers plain Trainers (main process only)."""
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir() and not (ckpt / "lcot.json").is_file():
            write_lcot_config(ckpt, self.info)


