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

from lcot.collate import Collator
from lcot.data import read_records
from lcot.errors import LcotInputError, cli_errors
from lcot.tokens import LATENT_END, LATENT_PAD, LATENT_START
from lcot.trainer import (
    LatentTrainer,
    LcotConfigCallback,
    NonFiniteLossError,
    StageSpec,
    TrainCollate,
    last_checkpoint,
    read_lcot_config,
    write_lcot_config,
)

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcot.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", required=True, choices=["stage1", "vcot", "stage2", "stage3"],
      help="stage1: format warm-up without images; vcot: visual-CoT warm-up, question + thought images visible to "
           "every later token (the answer too), CE only (for models trained from scratch, see README); "
           "stage2: question + thought images, 4D mask, CE + align; "
           "stage3: no thought images, K sampled in 1..latent_size each step, CE + align")
    a("--model_name_or_path", required=True, help="local checkpoint folder (a real Qwen2.5-VL, the tiny model, or "
      "the previous stage's output); never written to")
    a("--train_jsonl", required=True, help="training records (JSONL, see README)")
    a("--output_dir", required=True, help="where checkpoints and the final model go")
    a("--teacher_latent_dir", help="teacher latents from lcot.precompute_teacher_latents (stage2, stage3; not "
      "needed with --align_weight 0)")
    a("--latent_size", type=int, default=32, help="K latent slots (stage1, vcot, stage2; 0 = no latent slots, the "
      "answer right after the question) or Kmax (stage3)")
    a("--latent_feed", choices=["continuous", "pause"], default="continuous",
      help="continuous: each latent slot's input is the previous position's last hidden state (the method); "
           "pause: the control, every slot's input is one learned embedding and nothing is fed back")
    a("--align_weight", type=float, default=1.0, help="weight of the alignment loss (stage2, stage3)")
    a("--align", choices=["cosine", "mse", "centered"], default="cosine",
      help="alignment: 1 - cosine along hidden, MSE, or centered: 1 - cosine after subtracting the teacher's mean "
           "latent per position (over the training records) from both; see lcot.loss.align_loss")
    a("--latent_grad", choices=["full", "truncated"], default="full",
      help="full: backprop through the whole latent chain; truncated: the chain runs without gradients, then one "
           "parallel pass with gradients (much faster on GPU; needed with --gradient_checkpointing)")
    a("--latent_curriculum", action="store_true",
      help="stage3 only: a curriculum over K after Coconut's stages; the optimizer steps are cut into latent_size "
           "equal phases and phase c samples K in 1..c (default: K in 1..latent_size from the first step)")
    a("--question_images", action="store_true", help="stage1 only: include the question images (default: none)")
    a("--skip_missing_thought", action="store_true",
      help="stage2/stage3: skip records without thought images (they have no teacher latents) and say how many, "
           "instead of stopping")
    a("--epochs", type=float, default=1.0, help="passes over the training JSONL")
    a("--max_steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    a("--bsz", type=int, default=1, help="records per device per micro-batch (padded; K is shared in a batch)")
    a("--grad_accum_steps", type=int, default=8, help="micro-batches per optimizer step")
    a("--lr", type=float, default=1e-5, help="peak learning rate (AdamW)")
    a("--lr_scheduler", choices=["linear", "cosine", "constant"], default="linear",
      help="learning-rate schedule after the warm-up")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--warmup_ratio", type=float, default=0.03, help="fraction of steps for LR warm-up")
    a("--seed", type=int, default=42, help="seed of init, data order and stage3's K draws")
    a("--logging_steps", type=int, default=10, help="log CE, alignment, cosine per position every N steps")
    a("--save_steps", type=int, default=500, help="write a checkpoint every N optimizer steps")
    a("--save_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    a("--bf16", action="store_true", help="load and train in bfloat16 (GPU)")
    a("--gradient_checkpointing", action="store_true", help="recompute activations (needs --latent_grad truncated)")
    a("--freeze_vision", action="store_true",
      help="freeze the vision tower (frozen anyway in stage1 without --question_images)")
    a("--lora", action="store_true", help="train LoRA adapters (peft) on the language model; merged at the end")
    a("--lora_r", type=int, default=16, help="LoRA rank")
    a("--lora_alpha", type=int, default=32, help="LoRA alpha (scale = alpha / r)")
    a("--lora_dropout", type=float, default=0.05, help="LoRA dropout")
    a("--lora_targets", default=LORA_TARGETS, help="comma-separated module names in the language model")
    a("--max_pixels", type=int, default=None, help="image processor max_pixels (default: the checkpoint's)")
    a("--preprocess", action="store_true",
      help="read and process every record's images (and teacher latents) once, before training, and keep them in "
           "memory (exact uint8 pixel codes): much faster for small images, memory-hungry for large datasets")
    a("--num_workers", type=int, default=0, help="DataLoader worker processes that build batches")
    a("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
      help="attention kernel of the language model (the 4D mask works with both)")
    a("--resume_from_checkpoint", nargs="?", const="last", default=None,
      help="resume from a checkpoint folder, or from the last one in --output_dir when given without a value")
    a("--overwrite_output_dir", action="store_true", help="allow a non-empty --output_dir (its content is replaced)")
    return p


def check_dirs(args) -> None:
    model, out = Path(args.model_name_or_path).resolve(), Path(args.output_dir).resolve()
    if out == model or model in out.parents:
        raise LcotInputError("--output_dir", f"{out} is the input model folder (or inside it)",
                             "write each stage to a new folder; the input model is never written to")
    if out.is_dir() and any(out.iterdir()) and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        raise LcotInputError("--output_dir", f"{out} is not empty",
                             "pass --resume_from_checkpoint to continue, --overwrite_output_dir to replace, "
                             "or choose a new folder")
    if args.overwrite_output_dir and out.is_dir() and not args.resume_from_checkpoint:
        for flag in ("model_name_or_path", "train_jsonl", "teacher_latent_dir"):
            given = getattr(args, flag)
            if given and (out == Path(given).resolve() or out in Path(given).resolve().parents):
                raise LcotInputError("--output_dir", f"--overwrite_output_dir would delete {out}, which holds "
                                     f"--{flag} {given}", "choose an --output_dir that holds none of the inputs")
    if not 0 <= args.warmup_ratio < 1:
        raise LcotInputError("--warmup_ratio", f"must be in [0, 1), got {args.warmup_ratio}",
                             "it is the fraction of the optimizer steps spent warming up the learning rate")
    least = 1 if args.stage in ("stage2", "stage3") else 0  # stage2 shows thought images only to latent slots
    if args.latent_size < least:
        raise LcotInputError("--latent_size", f"must be >= {least} for {args.stage}, got {args.latent_size}",
                             "0 (no latent slots, the answer right after the question) is for stage1 and vcot")
    if args.latent_curriculum and args.stage != "stage3":
        raise LcotInputError("--latent_curriculum", f"is a stage3 schedule (K sampled per step), not for {args.stage}",
                             "drop the flag, or train --stage stage3")
    if args.stage in ("stage2", "stage3") and args.align_weight > 0 and not args.teacher_latent_dir:
        raise LcotInputError("--teacher_latent_dir", f"{args.stage} needs teacher latents",
                             "run `python -m lcot.precompute_teacher_latents` first and pass its --output_dir "
                             "(or train with --align_weight 0, without alignment)")
    if args.gradient_checkpointing and args.latent_grad == "full":
        raise LcotInputError("--gradient_checkpointing", "needs --latent_grad truncated",
                             "gradient checkpointing drops the KV cache the full-gradient latent chain uses")


def resume_point(args) -> str | None:
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
    for key in ("stage", "latent_size", "lora", "seed", "align", "latent_grad", "latent_feed", "latent_curriculum"):
        if key in saved and saved[key] != getattr(args, key):
            raise LcotInputError("--resume_from_checkpoint", f"{resume} was trained with --{key} {saved[key]}, "
                                 f"this run has --{key} {getattr(args, key)}",
                                 "resume with the same settings, or train into a new --output_dir")
    return resume


def apply_lora(model, args):
    from peft import LoraConfig, get_peft_model

    names = "|".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=rf".*language_model.*\.({names})")
    return get_peft_model(model, cfg)


def training_args(args, freeze_vision: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.bsz,
        gradient_accumulation_steps=args.grad_accum_steps, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type=("constant_with_warmup" if args.lr_scheduler == "constant" else
                                                  args.lr_scheduler),
        # transformers 5.17 reads a float in [0, 1) given as warmup_steps as a ratio (warmup_ratio is deprecated)
        weight_decay=args.weight_decay, warmup_steps=args.warmup_ratio, seed=args.seed,
        data_seed=args.seed, logging_steps=args.logging_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False, report_to=[],
        dataloader_num_workers=args.num_workers, dataloader_persistent_workers=args.num_workers > 0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=not freeze_vision, save_only_model=False)


def train(args) -> Path:
    from lcot.load import load

    check_dirs(args)
    resume = resume_point(args)
    spec = StageSpec(args.stage, args.latent_size, args.align_weight, args.align, args.latent_grad, args.seed,
                     args.latent_feed, args.latent_curriculum)
    # stage3 shows no thought images, but its teacher files exist only for records that have them
    records = read_records(args.train_jsonl, need_thought_images=spec.uses_teacher or spec.thought_images,
                           skip_missing_thought=args.skip_missing_thought)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, processor = load(args.model_name_or_path, dtype, attn_implementation=args.attn_implementation,
                            max_pixels=args.max_pixels)
    hidden = model.config.text_config.hidden_size
    collator = Collator(processor, model.config, args.latent_size, thought_images=spec.thought_images,
                        question_images=args.stage != "stage1" or args.question_images, visual_cot=spec.visual_cot,
                        cache=args.preprocess)
    data_collator = TrainCollate(collator, args.teacher_latent_dir if spec.uses_teacher else None, hidden, dtype,
                                 cache=args.preprocess)
    data_collator.check_teachers(records)  # fail before training, not at hour 20
    freeze_vision = args.freeze_vision or args.stage == "stage1" and not args.question_images
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    model.config.use_cache = False
    if args.lora:
        model = apply_lora(model, args)
    if args.preprocess:
        data_collator.prepare(records)
    teacher_mean = data_collator.teacher_mean(records) if spec.uses_teacher and args.align == "centered" else None
    info = {"stage": args.stage, "latent_size": args.latent_size, "base_model": str(args.model_name_or_path),
            "teacher_latent_dir": args.teacher_latent_dir, "align_weight": args.align_weight, "align": args.align,
            "latent_grad": args.latent_grad, "tokens": {"start": LATENT_START, "end": LATENT_END, "pad": LATENT_PAD},
            "lora": args.lora, "seed": args.seed, "latent_feed": args.latent_feed,
            "latent_curriculum": args.latent_curriculum}
    if args.overwrite_output_dir and Path(args.output_dir).is_dir() and not args.resume_from_checkpoint:
        from accelerate import PartialState

        state = PartialState()  # several processes: one removes the folder, the others wait for it
        if state.is_main_process:
            shutil.rmtree(args.output_dir)
        state.wait_for_everyone()
    trainer = LatentTrainer(
        model=model, args=training_args(args, freeze_vision), train_dataset=records,
        data_collator=data_collator,
        processing_class=processor, spec=spec, teacher_mean=teacher_mean, callbacks=[LcotConfigCallback(info)])
    trainer.train(resume_from_checkpoint=resume)
    final = trainer.model.merge_and_unload() if args.lora else trainer.model
    # FSDP shards the weights: gathering the full state dict is collective, so every process takes part
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        save_final(final, processor, Path(args.output_dir), info, state_dict)
    trainer.accelerator.wait_for_everyone()
    return Path(args.output_dir)


def save_final(model, processor, out: Path, info: dict, state_dict: dict | None = None) -> None:
    """The final model into `out`, each file complete: written to a staging folder, then moved in.

    lcot.json comes last, so its presence marks a finished stage.
    """
    staging = out / ".tmp-final"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
    for f in sorted(staging.iterdir()):
        if f.is_dir() and (out / f.name).is_dir():
            shutil.rmtree(out / f.name)
        os.replace(f, out / f.name)
    staging.rmdir()
    write_lcot_config(out, info)


def to_argv(**kwargs) -> list[str]:
    """Keyword arguments -> CLI flags: run_stage(stage="stage1", bf16=True) == --stage stage1 --bf16."""
    argv: list[str] = []
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv.append(str(value))
    return argv


def run_stage(**kwargs) -> Path:
    """Python entry for notebooks: the same flags as the CLI, as keyword arguments."""
    return train(parser().parse_args(to_argv(**kwargs)))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        out = train(args)
    except NonFiniteLossError as err:
        print(f"lcot: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    print(f"lcot: {args.stage} done: {out}")


if __name__ == "__main__":
    main()
