"""Training entry point: stage1 (format warm-up), stage2 (thought images + mask), stage3 (latents only).

    python -m lcot.main --stage stage1 --model_name_or_path M --train_jsonl F --output_dir O \\
        --latent_size 32 --epochs 1 --bsz 1 --grad_accum_steps 8
    python -m lcot.main --stage stage2 ... --teacher_latent_dir T --align_weight 1.0

Several GPUs: `accelerate launch -m lcot.main ...` (same flags).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from lcot import config
from lcot.console import quiet_libraries
from lcot.core.adjoint import COMPILE_ENV as ADJOINT_COMPILE_ENV
from lcot.core.collate import Collator
from lcot.core.graph import COMPILE_NOTE, graph_parallel_pass, step_compile, step_compiles
from lcot.core.latent import compile_parallel_pass
from lcot.core.model import bptt_links
from lcot.core.tokens import LATENT_END, LATENT_PAD, LATENT_START
from lcot.errors import LcotInputError, check_output, cli_errors, writing
from lcot.io import inside
from lcot.pipeline.data import read_records
from lcot.pipeline.runs import (
    check_unlocked,
    last_checkpoint,
    process_state,
    read_lcot_config,
    run_lock,
    write_lcot_config,
)
from lcot.pipeline.trainer import (
    LatentTrainer,
    LcotConfigCallback,
    NonFiniteLossError,
    TrainCollate,
    TrainConfig,
    all_ranks_raise,
)


def parser() -> argparse.ArgumentParser:
    return config.parser(TrainConfig, "python -m lcot.main", __doc__)


def check(args: TrainConfig) -> None:
    """Refuse settings and folders that cannot work, before anything is loaded."""
    # accelerate's own test (Accelerator, AcceleratorState): `accelerate launch --use_fsdp`, or a config with
    # distributed_type: FSDP, sets ACCELERATE_USE_FSDP=true in every process
    if args.lora and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise LcotInputError("--lora", "LoRA with FSDP is not supported (accelerate is configured for FSDP: "
                             "ACCELERATE_USE_FSDP=true)", "use DDP (`accelerate launch --multi_gpu`) for LoRA, or "
                             "full fine-tuning (without --lora) with FSDP")
    out = Path(args.output_dir).resolve()
    if inside(out, args.model_name_or_path):
        raise LcotInputError("--output_dir", f"{out} is the input model folder (or inside it)",
                             "write each stage to a new folder; the input model is never written to")
    check_output("--output_dir", out)
    check_unlocked(out)  # a folder another live run writes is busy, not merely "not empty"
    if out.is_dir() and any(out.iterdir()) and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise LcotInputError("--output_dir", f"{out} is not empty",
                             "pass --resume_from_checkpoint to continue, --overwrite_output_dir to replace, "
                             "or choose a new folder")
    if args.overwrite_output_dir and out.is_dir() and not args.resume_from_checkpoint:
        for flag in ("model_name_or_path", "train_jsonl", "teacher_latent_dir"):
            given = getattr(args, flag)
            if given and inside(given, out):
                raise LcotInputError("--output_dir", f"--overwrite_output_dir would delete {out}, which holds "
                                     f"--{flag} {given}", "choose an --output_dir that holds none of the inputs")
    if not 0 <= args.warmup_ratio < 1:
        raise LcotInputError("--warmup_ratio", f"must be in [0, 1), got {args.warmup_ratio}",
                             "it is the fraction of the optimizer steps spent warming up the learning rate")
    least = 1 if args.stage in ("stage2", "stage3") else 0  # stage2 shows thought images only to latent slots
    if args.num_latents < least:
        raise LcotInputError("--latent_size", f"must be >= {least} for {args.stage}, got {args.num_latents}",
                             "0 (no latent slots, the answer right after the question) is for stage1 and vcot")
    if args.latent_curriculum and args.stage != "stage3":
        raise LcotInputError("--latent_curriculum", f"is a stage3 schedule (K sampled per step), not for {args.stage}",
                             "drop the flag, or train --stage stage3")
    if args.stage in ("stage2", "stage3") and args.align_weight > 0 and not args.teacher_latent_dir:
        raise LcotInputError("--teacher_latent_dir", f"{args.stage} needs teacher latents",
                             "run `python -m lcot.precompute_teacher_latents` first and pass its --output_dir "
                             "(or train with --align_weight 0, without alignment)")
    try:
        bptt_links(args.latent_grad)
    except ValueError as err:
        raise LcotInputError("--latent_grad", str(err), "e.g. --latent_grad adjoint, truncated, or bptt:2") from None
    if args.graph_pass and (args.compile or args.gradient_checkpointing):
        other = "--compile" if args.compile else "--gradient_checkpointing"
        raise LcotInputError("--graph_pass", f"does not combine with {other}",
                             "choose one: --graph_pass for small models (host-bound steps), --compile or "
                             "--gradient_checkpointing otherwise")
    if args.graph_pass and args.latent_grad in ("full", "adjoint") and args.latent_feed == "continuous":
        why = "its passes run through a KV cache" if args.latent_grad == "full" else "it runs a second backward " \
            "through the pass, which a graph cannot"
        print(f"lcot: note: --graph_pass has nothing to graph with --latent_grad {args.latent_grad} ({why}); this "
              "stage runs as without it", file=sys.stderr)
    if args.compile and args.latent_grad == "adjoint":
        print("lcot: note: --compile has no effect on the pass with gradients of --latent_grad adjoint (it runs a "
              "second backward through it, which a compiled pass does not allow); that pass runs uncompiled",
              file=sys.stderr)
    idle = chain_idle(args)
    if args.compile_step in (True, "on") and idle:
        print(f"lcot: note: --compile_step has no effect here ({idle}); it compiles the latent chain without "
              "gradients of --latent_grad truncated, adjoint or bptt:M", file=sys.stderr)
    if args.gradient_checkpointing and args.latent_grad == "full":
        raise LcotInputError("--gradient_checkpointing", "does not work with --latent_grad full",
                             "gradient checkpointing drops the KV cache the full-gradient latent chain uses; "
                             "--latent_grad adjoint gives the same gradient and works with it")
    if args.latent_grad == "adjoint" and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise LcotInputError("--latent_grad", "adjoint is not supported with FSDP (accelerate is configured for "
                             "FSDP: ACCELERATE_USE_FSDP=true): its second backward would run FSDP's gradient hooks",
                             "use DDP (`accelerate launch --multi_gpu`), or --latent_grad full or truncated")


def resume_point(args: TrainConfig) -> str | None:
    """The checkpoint to resume from: a given folder, or the last complete one in --output_dir.

    Without a checkpoint yet (a run killed before its first save) training starts from step 0.
    A checkpoint of another stage, K, LoRA, seed (stage3's K draws), alignment or gradient mode is refused
    rather than silently continued.
    """
    resume = args.resume_from_checkpoint
    if resume is None:
        return None
    if resume == "last":
        last = last_checkpoint(args.output_dir)
        if last is None:
            print(f"lcot: no checkpoint in {args.output_dir} yet: training starts from step 0", file=sys.stderr)
            return None
        resume = str(last)
    elif not (Path(resume) / "trainer_state.json").is_file():
        raise LcotInputError("--resume_from_checkpoint", f"{resume} is not a checkpoint folder (no trainer_state.json)",
                             "pass a checkpoint-N folder of an earlier run, or the flag alone for the last one in "
                             "--output_dir")
    saved = read_lcot_config(resume)
    for f in config.resume_keys(TrainConfig):
        if f.name in saved and saved[f.name] != getattr(args, f.name):
            raise LcotInputError("--resume_from_checkpoint", f"{resume} was trained with {config.flag(f)} "
                                 f"{saved[f.name]}, this run has {config.flag(f)} {getattr(args, f.name)}",
                                 "resume with the same settings, or train into a new --output_dir")
    return resume


def apply_lora(model, args: TrainConfig):
    from peft import LoraConfig, get_peft_model

    names = "|".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=rf".*language_model.*\.({names})")
    return get_peft_model(model, cfg)


def report_to(value: str) -> list[str]:
    """--report_to as Trainer's list; a tracker that is not installed stops here, not with a traceback."""
    from transformers.integrations import get_available_reporting_integrations

    names = [t.strip() for t in value.split(",") if t.strip() not in ("", "none")]
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise LcotInputError("--report_to", f"{missing[0]} is not installed (or not a tracker transformers knows)",
                             f"pip install {missing[0]}, or --report_to none; installed: "
                             f"{', '.join(get_available_reporting_integrations()) or 'none'}")
    return names


def training_args(args: TrainConfig, freeze_vision: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.bsz,
        gradient_accumulation_steps=args.grad_accum_steps, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type=("constant_with_warmup" if args.lr_scheduler == "constant" else
                                                  args.lr_scheduler),
        # transformers 5.17 reads a float in [0, 1) given as warmup_steps as a ratio (warmup_ratio is deprecated)
        weight_decay=args.weight_decay, warmup_steps=args.warmup_ratio, seed=args.seed,
        data_seed=args.seed, logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        report_to=report_to(args.report_to),
        dataloader_num_workers=args.num_workers, dataloader_persistent_workers=args.num_workers > 0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=not freeze_vision, save_only_model=False,
        # no host-device sync inside a step: batches are copied from pinned memory without blocking, and
        # LatentTrainer checks losses itself (at the optimizer step) instead of Trainer's per-batch NaN filter;
        # on a CPU there is no copy, and Trainer would warn that non_blocking goes without pinned memory
        accelerator_config={"non_blocking": torch.cuda.is_available()}, logging_nan_inf_filter=False)


def chain_idle(args: TrainConfig) -> str | None:
    """Why this stage runs no latent chain without gradients (which --compile_step compiles), or None."""
    return ("--latent_feed pause feeds nothing back" if args.latent_feed == "pause" else
            "--latent_size 0 has no latent slots" if args.num_latents == 0 else
            "--latent_grad full runs its chain with gradients, step by step on the dynamic cache"
            if args.latent_grad == "full" else None)


def one_gpu_per_process(targs: TrainingArguments) -> TrainingArguments:
    """One process sees several GPUs (started without a launcher): train on the first only, with a note.

    Trainer would wrap the model in nn.DataParallel, whose replicas break the latent model (and DDP is the
    way to use several GPUs); `accelerate launch` gives each GPU its own process.
    """
    if targs.n_gpu > 1:
        print(f"lcot: note: {targs.n_gpu} GPUs are visible to one process: training on {targs.device} only; use "
              "`accelerate launch -m lcot.main ...` to train on all of them", file=sys.stderr)
        targs._n_gpu = 1
    return targs


def train(args: TrainConfig) -> Path:
    """Run one stage; returns the output folder (the final model, loadable with from_pretrained).

    The output folder is locked for the whole run (`runs.run_lock`): a second run started on it is refused.
    """
    check(args)
    with run_lock(args.output_dir):
        return _train(args)


def _train(args: TrainConfig) -> Path:
    from lcot.pipeline.load import load

    resume = resume_point(args)
    # stage3 shows no thought images, but its teacher files exist only for records that have them
    records = read_records(args.train_jsonl, need_thought_images=args.uses_teacher or args.thought_images,
                           skip_missing_thought=args.skip_missing_thought)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, processor = load(args.model_name_or_path, dtype, attn_implementation=args.attn_implementation,
                            max_pixels=args.max_pixels)
    hidden = model.config.text_config.hidden_size
    collator = Collator(processor, model.config, args.num_latents, thought_images=args.thought_images,
                        question_images=args.stage != "stage1" or args.question_images, visual_cot=args.visual_cot,
                        cache=args.preprocess)
    data_collator = TrainCollate(collator, args.teacher_latent_dir if args.uses_teacher else None, hidden, dtype,
                                 cache=args.preprocess)
    if not args.preprocess:  # with it, prepare() below reads and checks every teacher file once
        data_collator.check_teachers(records)  # fail before training, not at hour 20
    freeze_vision = args.freeze_vision or args.stage == "stage1" and not args.question_images
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    model.config.use_cache = False
    if args.compile:
        compile_parallel_pass(model)
    step_compile(model, args.compile_step)
    if not chain_idle(args) and step_compiles(args.compile_step, "cuda" if torch.cuda.is_available() else "cpu") \
            and process_state().is_main_process:
        print(COMPILE_NOTE + (" The full gradient's pass over the slots (--latent_grad adjoint) is compiled too, "
                              f"which takes minutes more ({ADJOINT_COMPILE_ENV}=0 skips that)."
                              if args.latent_grad == "adjoint" else ""), file=sys.stderr)
    if args.graph_pass:
        graph_parallel_pass(model)
    if args.lora:
        model = apply_lora(model, args)
    if args.preprocess:
        data_collator.prepare(records)
    teacher_mean = data_collator.teacher_mean(records) if args.uses_teacher and args.align == "centered" else None
    info = {**config.saved(args), "base_model": str(args.model_name_or_path),
            "tokens": {"start": LATENT_START, "end": LATENT_END, "pad": LATENT_PAD}}
    if args.overwrite_output_dir and Path(args.output_dir).is_dir() and not args.resume_from_checkpoint:
        state = process_state()  # several processes: one removes the folder, the others wait for it
        if state.is_main_process:
            shutil.rmtree(args.output_dir)
        state.wait_for_everyone()
    trainer = LatentTrainer(
        model=model, args=one_gpu_per_process(training_args(args, freeze_vision)), train_dataset=records,
        data_collator=data_collator,
        processing_class=processor, config=args, teacher_mean=teacher_mean, callbacks=[LcotConfigCallback(info)])
    trainer.train(resume_from_checkpoint=resume)
    final = trainer.model.merge_and_unload() if args.lora else trainer.model
    # FSDP shards the weights: gathering the full state dict is collective, so every process takes part
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    failed = None
    if trainer.is_world_process_zero():
        try:
            save_final(final, processor, Path(args.output_dir), info, state_dict)
        except Exception as err:
            failed = err
    all_ranks_raise(trainer.accelerator, failed)  # a failed save stops every process, not only the main one
    return Path(args.output_dir)


def save_final(model, processor, out: Path, info: dict, state_dict: dict | None = None) -> None:
    """The final model into `out`, each file complete: written to a staging folder, then moved in.

    lcot.json comes last, so its presence marks a finished stage. A failed save (a full disk: reported naming
    `out`) removes the staging folder.
    """
    staging = out / ".tmp-final"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with writing(out):
            model.save_pretrained(staging, state_dict=state_dict)
            processor.save_pretrained(staging)
    except BaseException:  # a full disk, or Ctrl-C: no half-written staging folder stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for f in sorted(staging.iterdir()):
        if f.is_dir() and (out / f.name).is_dir():
            shutil.rmtree(out / f.name)
        os.replace(f, out / f.name)
    staging.rmdir()
    write_lcot_config(out, info)


def run_stage(**kwargs) -> Path:
    """Python entry for notebooks: TrainConfig's fields as keyword arguments (the CLI's defaults); paths may
    be Path objects."""
    return train(TrainConfig(**{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = config.parse(TrainConfig, argv, "python -m lcot.main", __doc__)
    quiet_libraries(args.verbose)
    try:
        out = train(args)
    except NonFiniteLossError as err:
        print(f"lcot: error: {err}", file=sys.stderr)  # every rank stopped at the same step (LatentTrainer)
        raise SystemExit(3) from None  # cli_errors leaves the process group first
    print(f"lcot: {args.stage} done: {out}")


if __name__ == "__main__":
    main()
