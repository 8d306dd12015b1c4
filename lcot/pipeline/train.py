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
from transformers import HfArgumentParser, TrainingArguments

from lcot.console import quiet_libraries
from lcot.core.collate import Collator
from lcot.core.model import bptt_links
from lcot.core.tokens import LATENT_END, LATENT_PAD, LATENT_START
from lcot.errors import LcotInputError, check_output, cli_errors, writing
from lcot.io import inside
from lcot.pipeline.data import read_records
from lcot.pipeline.load import compile_note
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

PROG = "python -m lcot.main"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def parser() -> HfArgumentParser:
    """The flags of TrainConfig: transformers' TrainingArguments, the seed's spellings and lcot's own."""
    return HfArgumentParser(TrainConfig, prog=PROG, description=__doc__, formatter_class=_HelpFormatter)


def parse(argv: list[str] | None) -> TrainConfig:
    args, = parser().parse_args_into_dataclasses(argv)
    return args


def flag(name: str) -> str:
    """A field's flag as the help shows it first (the seed's spelling where it has one)."""
    return TrainConfig.FLAGS.get(name, f"--{name}")


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
    if args.warmup_steps < 0:
        raise LcotInputError("--warmup_steps", f"must be >= 0, got {args.warmup_steps}",
                             "optimizer steps of learning-rate warm-up, or a fraction of them when below 1")
    if args.fast == "off" and (args.compile or args.graph_pass):
        raise LcotInputError("--compile" if args.compile else "--graph_pass", "needs lcot.fast (--fast off runs the "
                             "reference passes only)", "drop the flag, or use --fast auto")
    least = 1 if args.stage in ("stage2", "stage3") else 0  # stage2 shows thought images only to latent slots
    if args.num_latents < least:
        raise LcotInputError("--latent_size", f"must be >= {least} for {args.stage}, got {args.num_latents}",
                             "0 (no latent slots, the answer right after the question) is for stage1 and vcot")
    if args.criterion_every:
        if args.criterion_every < 0 or args.criterion_records < 1:
            raise LcotInputError("--criterion_every" if args.criterion_every < 0 else "--criterion_records",
                                 "must be >= 1 (a check needs held-out records)", "e.g. --criterion_every 100 "
                                 "--criterion_records 100")
        if args.stage not in ("vcot", "stage2"):
            raise LcotInputError("--criterion_every", f"checks the thought-image benefit of vcot or stage2, not of "
                                 f"{args.stage}")
    if args.state_weight:
        if not args.state_field:
            raise LcotInputError("--state_weight", "needs --state_field, the JSONL field of the states after each "
                                 "step", "e.g. --state_field states")
        if args.stage not in ("stage2", "stage3"):
            raise LcotInputError("--state_weight", f"supervises latent slots in stage2 or stage3, not in {args.stage}")
    if args.teacher_forcing:
        if not 0 < args.teacher_forcing <= 1:
            raise LcotInputError("--teacher_forcing", f"must be in [0, 1], got {args.teacher_forcing}",
                                 "e.g. --teacher_forcing 0.5")
        if args.stage != "stage3" or not args.uses_teacher:
            raise LcotInputError("--teacher_forcing", "feeds the teacher's latents in stage3 (with its "
                                 f"--teacher_latent_dir and --align_weight > 0), not in {args.stage}")
        if args.latent_grad != "truncated" and not args.latent_grad.startswith("bptt:"):
            raise LcotInputError("--teacher_forcing", f"needs --latent_grad truncated or bptt:M, got "
                                 f"{args.latent_grad}", "e.g. --latent_grad bptt:1 (the gradient crosses one "
                                 "feedback link)")
        if args.latent_feed != "continuous":
            raise LcotInputError("--teacher_forcing", "needs --latent_feed continuous")
    if args.latent_curriculum and args.stage != "stage3":
        raise LcotInputError("--latent_curriculum", f"is a stage3 schedule (K sampled per step), not for {args.stage}",
                             "drop the flag, or train --stage stage3")
    if args.stage in ("stage2", "stage3") and args.align_weight > 0 and not args.teacher_latent_dir:
        raise LcotInputError("--teacher_latent_dir", f"{args.stage} needs teacher latents",
                             "run `python -m lcot.precompute_teacher_latents` first and pass its --output_dir "
                             "(or train with --align_weight 0, without alignment)")
    report_to(args.report_to)
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
    if args.compile_step == "on" and idle:
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
    for name in TrainConfig.RESUME:
        if name in saved and saved[name] != getattr(args, name):
            raise LcotInputError("--resume_from_checkpoint", f"{resume} was trained with {flag(name)} "
                                 f"{saved[name]}, this run has {flag(name)} {getattr(args, name)}",
                                 "resume with the same settings, or train into a new --output_dir")
    return resume


def apply_lora(model, args: TrainConfig):
    from peft import LoraConfig, get_peft_model

    names = "|".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=rf".*language_model.*\.({names})")
    return get_peft_model(model, cfg)


def report_to(value: str | list[str]) -> list[str]:
    """--report_to as Trainer's list; a tracker that is not installed stops here, not with a traceback."""
    from transformers.integrations import get_available_reporting_integrations

    given = value.split(",") if isinstance(value, str) else value
    names = [t.strip() for t in given if t.strip() not in ("", "none")]
    missing = [n for n in names if n not in get_available_reporting_integrations()]
    if missing:
        raise LcotInputError("--report_to", f"{missing[0]} is not installed (or not a tracker transformers knows)",
                             f"pip install {missing[0]}, or --report_to none; installed: "
                             f"{', '.join(get_available_reporting_integrations()) or 'none'}")
    return names


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


def stage_collator(args: TrainConfig, processor, model_config) -> Collator:
    """The collator (and so the mask) of a stage; the teacher precompute builds the same one for the stage its
    model was trained in (tests/test_pipeline.py compares them)."""
    return Collator(processor, model_config, args.num_latents, thought_images=args.thought_images,
                    question_images=args.stage != "stage1" or args.question_images, visual_cot=args.visual_cot,
                    cache=args.preprocess, visibility=args.thought_visibility)


def _train(args: TrainConfig) -> Path:
    from lcot.pipeline.load import load

    resume = resume_point(args)
    # stage3 shows no thought images, but its teacher files exist only for records that have them
    records = read_records(args.train_jsonl, need_thought_images=args.uses_teacher or args.thought_images,
                           skip_missing_thought=args.skip_missing_thought)
    if args.state_weight and not any(args.state_field in r.extra for r in records):
        raise LcotInputError(str(args.train_jsonl), f"no record has the field {args.state_field!r} that "
                             "--state_field names", "give the field of the states after each step, e.g. states")
    held_out = []
    if args.criterion_every:
        if len(records) <= args.criterion_records:
            raise LcotInputError("--criterion_records", f"{args.criterion_records} held out of {len(records)} "
                                 f"records leaves none to train on", "hold out fewer records")
        records, held_out = records[:-args.criterion_records], records[-args.criterion_records:]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, processor = load(args.model_name_or_path, dtype, attn_implementation=args.attn_implementation,
                            max_pixels=args.max_pixels, speed=args, compile=args.compile, graph_pass=args.graph_pass)
    hidden = model.config.text_config.hidden_size
    collator = stage_collator(args, processor, model.config)
    data_collator = TrainCollate(collator, args.teacher_latent_dir if args.uses_teacher else None, hidden, dtype,
                                 cache=args.preprocess, state_field=args.state_field if args.state_weight else None)
    if not args.preprocess:  # with it, prepare() below reads and checks every teacher file once
        data_collator.check_teachers(records)  # fail before training, not at hour 20
    freeze_vision = args.freeze_vision or args.stage == "stage1" and not args.question_images
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    args.ddp_find_unused_parameters = not freeze_vision
    model.config.use_cache = False
    note = compile_note(args, "cuda" if torch.cuda.is_available() else "cpu") if not chain_idle(args) else None
    if note and process_state().is_main_process:
        print(note + (" The full gradient's pass over the slots (--latent_grad adjoint) is compiled too, which "
                      "takes minutes more." if args.latent_grad == "adjoint" else ""), file=sys.stderr)
    if args.lora:
        model = apply_lora(model, args)
    if args.preprocess:
        data_collator.prepare(records)
    # the teacher's mean latent per position: centred alignment, and the centred per-position metrics of any stage
    teacher_mean = data_collator.teacher_mean(records) if args.uses_teacher else None
    info = {**{name: getattr(args, name) for name in TrainConfig.SAVED}, "base_model": str(args.model_name_or_path),
            "tokens": {"start": LATENT_START, "end": LATENT_END, "pad": LATENT_PAD}}
    if args.overwrite_output_dir and Path(args.output_dir).is_dir() and not args.resume_from_checkpoint:
        state = process_state()  # several processes: one removes the folder, the others wait for it
        if state.is_main_process:
            shutil.rmtree(args.output_dir)
        state.wait_for_everyone()
    callbacks = [LcotConfigCallback(info)]
    if held_out:
        from lcot.pipeline.criterion import CriterionStop

        callbacks.append(CriterionStop(processor, held_out, args.num_latents, args.criterion_every,
                                       args.criterion_accuracy, args.criterion_benefit, args.visual_cot,
                                       args.thought_visibility, args.latent_feed))
    trainer = LatentTrainer(
        model=model, args=one_gpu_per_process(args), train_dataset=records, data_collator=data_collator,
        processing_class=processor, teacher_mean=teacher_mean, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    if held_out:
        info["criterion"] = callbacks[-1].summary(trainer.state.global_step)
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


SEED_NAMES = {"epochs": "num_train_epochs", "bsz": "per_device_train_batch_size",
              "grad_accum_steps": "gradient_accumulation_steps", "latent_size": "num_latents"}


def run_stage(**kwargs) -> Path:
    """Python entry for notebooks: TrainConfig's fields as keyword arguments (the CLI's defaults; the seed's names
    epochs, bsz, grad_accum_steps and latent_size work too); paths may be Path objects."""
    fields = {SEED_NAMES.get(k, k): str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    return train(TrainConfig(**fields))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    quiet_libraries(args.verbose)
    try:
        out = train(args)
    except NonFiniteLossError as err:
        print(f"lcot: error: {err}", file=sys.stderr)  # every rank stopped at the same step (LatentTrainer)
        raise SystemExit(3) from None  # cli_errors leaves the process group first
    print(f"lcot: {args.stage} done: {out}")


if __name__ == "__main__":
    main()
