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
from lcot.config import option
from lcot.console import quiet_libraries
from lcot.core.graph import COMPILE_NOTE, COMPILE_SETTINGS, step_compile, step_compiles
from lcot.errors import LcotInputError, check_output, cli_errors
from lcot.io import inside
from lcot.pipeline.data import read_records
from lcot.pipeline.teacher import precompute


@dataclass
class PrecomputeConfig:
    """The flags of `python -m lcot.precompute_teacher_latents` (the seed's spelling)."""

    model_name_or_path: str = option(help="usually the stage1 output folder")
    train_jsonl: str = option(help="the records whose teacher latents to write")
    output_dir: str = option(help="the teacher latent folder (--teacher_latent_dir later)")
    k_max: int = option(32, "latents stored per record (>= every later --latent_size)")
    bsz: int = option(16, "records per forward (records of similar shapes are batched together); the batch shares "
                      "the weight reads of the K latent steps: on an H100 (compiled step) a batch of 16 costs about "
                      "1.2-1.3x a forward of it, of 2 about 2.5-2.7x (benchmarks/RESULTS.md); also the batch "
                      "of the benefit evaluation. Lower it if large images (--max_pixels) run out of memory")
    num_workers: int = option(0, "DataLoader worker processes that build batches while the model runs")
    bf16: bool = option(False, "compute in bfloat16 (then train stage2/3 with --bf16 too)")
    max_pixels: int | None = option(None, "image processor max_pixels (match training; None: the checkpoint's)")
    compile_step: str = option("auto", "torch.compile the one-token latent step, as `python -m lcot.main "
                               "--compile_step` (see its --help; auto: on a GPU), the benefit evaluation's decoding "
                               "steps too; LCOT_COMPILE_STEP=0 turns auto off", choices=COMPILE_SETTINGS, const="on")
    skip_missing_thought: bool = option(False, "skip records without thought images (and report how many) instead "
                                        "of stopping")
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
    from lcot.pipeline.generate import trained_feed
    from lcot.pipeline.load import load
    from lcot.pipeline.runs import process_state, read_lcot_config, run_lock

    state = process_state()
    with run_lock(args.output_dir):  # one run writes a folder at a time (all processes of it)
        records = read_records(args.train_jsonl, need_thought_images=True,
                               skip_missing_thought=args.skip_missing_thought)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model, processor = load(args.model_name_or_path, dtype, state.device, max_pixels=args.max_pixels)
        feed = trained_feed(args.model_name_or_path)
        step_compile(model, args.compile_step)
        if step_compiles(args.compile_step, model.device) and state.is_main_process:
            print(COMPILE_NOTE, file=sys.stderr)
        counts = precompute(model, processor, records, args.output_dir, args.k_max, args.bsz,
                            model_name=str(args.model_name_or_path), rank=state.process_index,
                            world_size=state.num_processes, progress=state.is_local_main_process, feed=feed,
                            num_workers=args.num_workers)
        state.wait_for_everyone()
        print(f"lcot: teacher latents in {args.output_dir}: {counts['computed']} computed, {counts['kept']} kept "
              f"(process {state.process_index + 1}/{state.num_processes})")
        if args.benefit_records > 0 and state.is_main_process:
            sample = records[: args.benefit_records]
            # in the setting the model was trained in: a visual-CoT warm-up's answer sees the thought images
            visual_cot = read_lcot_config(args.model_name_or_path).get("stage") == "vcot"
            acc = {t: evaluate(model.eval(), processor, sample, [args.k_max], thought_images=t, batch_size=args.bsz,
                               feed=feed, visual_cot=visual_cot and t, progress=False)["accuracy"][args.k_max]
                   for t in (True, False)}
            print(f"lcot: on {len(sample)} training records, K={args.k_max}: " + benefit_line(acc[True], acc[False]))


if __name__ == "__main__":
    main()
