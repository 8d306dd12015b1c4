"""Teacher latents, offline: thought images at the start of the assistant turn, latent mode, no gradients.

    python -m lcot.precompute_teacher_latents --model_name_or_path OUT_STAGE1 --train_jsonl F \\
        --output_dir TEACHER --k_max 32

Writes TEACHER/latent_last_layer_jsonl_{idx:06d}.pt per record. A rerun keeps complete, matching
files (so a killed run resumes). Several GPUs: `accelerate launch -m lcot.precompute_teacher_latents`
splits the records across processes. The output folder is locked while the command runs: a second
precompute (or training) started on it is refused.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lcot import config
from lcot.config import SpeedConfig, option
from lcot.console import quiet_libraries
from lcot.core.mask import VISIBILITY
from lcot.errors import LcotInputError, check_output, cli_errors
from lcot.io import inside
from lcot.pipeline.data import read_records
from lcot.pipeline.teacher import precompute


@dataclass
class PrecomputeConfig(SpeedConfig):
    """The flags of `python -m lcot.precompute_teacher_latents` (the seed's spelling), the speed flags among them."""

    model_name_or_path: str = option(None, "usually the stage1 output folder", required=True)
    train_jsonl: str = option(None, "the records whose teacher latents to write", required=True)
    output_dir: str = option(None, "the teacher latent folder (--teacher_latent_dir later)", required=True)
    k_max: int = option(32, "latents stored per record (>= every later --latent_size)")
    bsz: int = option(16, "records per forward (records of similar shapes are batched together, and share the weight "
                      "reads of the K latent steps: larger batches cost less per record); also the batch of the "
                      "benefit evaluation. Lower it if large images (--max_pixels) run out of memory")
    num_workers: int = option(0, "DataLoader worker processes that build batches while the model runs")
    bf16: bool = option(False, "compute in bfloat16 (then train stage2/3 with --bf16 too)")
    max_pixels: int | None = option(None, "image processor max_pixels (match training; None: the checkpoint's)")
    skip_missing_thought: bool = option(False, "skip records without thought images (and report how many) instead "
                                        "of stopping")
    thought_visibility: str | None = option(None, "which thought image each latent slot sees: all, stepwise, "
                                            "cumulative (None: the one the model was trained with, its lcot.json)",
                                            choices=(*VISIBILITY, None))
    benefit_records: int = option(200, "answer this many records with and without thought images and print the "
                                  "teacher's thought-image benefit (0: skip)")
    verbose: bool = option(False, "print everything transformers prints (its bars at each model load)",
                           aliases=("-v",))


PROG = "python -m lcot.precompute_teacher_latents"


def parser() -> argparse.ArgumentParser:
    return config.parser(PrecomputeConfig, PROG, __doc__)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = config.parse(PrecomputeConfig, argv, PROG, __doc__)
    quiet_libraries(args.verbose)
    if args.k_max < 1:
        raise LcotInputError("--k_max", f"must be >= 1, got {args.k_max}")
    check_output("--output_dir", args.output_dir)
    if inside(args.output_dir, args.model_name_or_path):
        raise LcotInputError("--output_dir", f"{Path(args.output_dir).resolve()} is the model folder (or inside it)",
                             "write teacher latents to a folder of their own")
    from lcot.pipeline.evaluate import benefit_line, evaluate
    from lcot.pipeline.generate import trained_feed, trained_visibility
    from lcot.pipeline.load import compile_note, load
    from lcot.pipeline.runs import process_state, read_lcot_config, run_lock

    state = process_state()
    with run_lock(args.output_dir):  # one run writes a folder at a time (all processes of it)
        records = read_records(args.train_jsonl, need_thought_images=True,
                               skip_missing_thought=args.skip_missing_thought)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model, processor = load(args.model_name_or_path, dtype, state.device, max_pixels=args.max_pixels,
                                speed=args)
        feed = trained_feed(args.model_name_or_path)
        # the mask the model was trained with: a visual-CoT warm-up's <abs_vis_token> (slot 1's input) sees the
        # thought images, and its slots see them as its --thought_visibility said
        visual_cot = read_lcot_config(args.model_name_or_path).get("stage") == "vcot"
        visibility = args.thought_visibility or trained_visibility(args.model_name_or_path)
        note = compile_note(args, model.device)
        if note and state.is_main_process:
            print(note, file=sys.stderr)
        counts = precompute(model, processor, records, args.output_dir, args.k_max, args.bsz,
                            model_name=str(args.model_name_or_path), rank=state.process_index,
                            world_size=state.num_processes, progress=state.is_local_main_process, feed=feed,
                            num_workers=args.num_workers, visibility=visibility, visual_cot=visual_cot)
        state.wait_for_everyone()
        print(f"lcot: teacher latents in {args.output_dir}: {counts['computed']} computed, {counts['kept']} kept "
              f"(process {state.process_index + 1}/{state.num_processes})")
        if args.benefit_records > 0 and state.is_main_process:
            sample = records[: args.benefit_records]
            # in the setting the model was trained in: a visual-CoT warm-up's answer sees the thought images
            acc = {t: evaluate(model.eval(), processor, sample, [args.k_max], thought_images=t, batch_size=args.bsz,
                               feed=feed, visual_cot=visual_cot and t, visibility=visibility,
                               progress=False)["accuracy"][args.k_max]
                   for t in (True, False)}
            print(f"lcot: on {len(sample)} training records, K={args.k_max}: " + benefit_line(acc[True], acc[False]))


if __name__ == "__main__":
    main()
