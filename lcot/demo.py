"""`make demo`: the method end to end on the embedded default, in a few minutes on 2 CPU cores.

tiny offline model + the bundled hops task -> visual-CoT warm-up -> teacher latents -> stage2 (centred
alignment) -> stage3 -> evaluation, figures under runs/demo/figures/ (`make figures` refreshes the committed
figures/demo/ instead), and one table: each model's accuracy with and
without thought images, beside the majority-answer rate. A model that gives one answer to every record is
marked as such, and the teacher's thought-image benefit is printed with its warning when it is near zero.
The budget is small: the warm-up learns to read the thought images (the teacher row), the latent stages
get only a few hundred steps here; `python -m lcot.experiment` runs the full matrix (see README).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lcot import config
from lcot.config import option
from lcot.console import quiet_libraries
from lcot.core.collate import Collator
from lcot.lab import plots
from lcot.lab.analysis import accuracy_cell
from lcot.lab.segments import display_segments
from lcot.pipeline.data import read_records
from lcot.pipeline.evaluate import benefit_line, evaluate, majority_rate, table
from lcot.pipeline.generate import trained_visibility
from lcot.pipeline.load import load
from lcot.pipeline.runs import read_metrics
from lcot.pipeline.train import run_stage
from lcot.precompute_teacher_latents import main as precompute_main
from lcot.toy.synthetic import generate as make_dataset
from lcot.toy.tiny import build_tiny


@dataclass
class DemoConfig:
    """The flags of `python -m lcot.demo` (`make demo`)."""

    run_dir: str = option("runs/demo", "where the model, data, checkpoints and teacher go")
    figures: str = option("runs/demo/figures", "where the PNG figures go (the committed figures/demo/ is written "
                          "only by `make figures`)")
    n: int = option(600, "hops records (a fifth held out)")
    num_latents: int = option(4, "K", flag="latent_size")
    warmup_steps: int = option(300, "optimizer steps of the visual-CoT warm-up (the teacher)")
    stage2_steps: int = option(500, "optimizer steps of stage2")
    stage3_steps: int = option(400, "optimizer steps of stage3")
    bsz: int = option(16, "records per optimizer step")
    lr: float = option(1e-3, "learning rate")
    thought_visibility: str = option("all", "which thought image each latent slot sees (lcot.main "
                                     "--thought_visibility)", choices=("all", "stepwise", "cumulative"))
    verbose: bool = option(False, "print everything the libraries print (transformers' dict of every log, its "
                           "bars at each load and save)", aliases=("-v",))
STAGES = ("warmup", "stage2", "stage3")


def mask_batch(model_dir: Path, jsonl: Path, num_latents: int) -> dict:
    """A stage2 batch of the JSONL's first record under the model's trained thought visibility."""
    model, processor = load(model_dir)
    return Collator(processor, model.config, num_latents, thought_images=True,
                    visibility=trained_visibility(str(model_dir)))(read_records(jsonl)[:1])


def figure_mask(model_dir: Path, jsonl: Path, num_latents: int, out: Path) -> Path:
    batch = mask_batch(model_dir, jsonl, num_latents)
    visibility = trained_visibility(str(model_dir))
    seen = "" if visibility == "all" else f" ({visibility})"
    ax = plots.plot_mask(batch["attention_mask_4d"][0, 0], display_segments(batch)[0],
                         title=f"stage2 mask of record 0 (K={num_latents}): only latents see the thought images{seen}")
    return plots.save(ax, out)


def figures(run: Path, fig_dir: Path, num_latents: int, jsonl: Path) -> list[Path]:
    made = [figure_mask(run / "warmup", jsonl, num_latents, fig_dir / "mask_stage2.png")]
    for stage in STAGES:
        rows = read_metrics(run / stage)
        made.append(plots.save(plots.plot_losses(rows, f"{stage} loss"), fig_dir / f"loss_{stage}.png"))
        if stage != "warmup":
            made.append(plots.save(plots.plot_cosine(rows, f"{stage}: latent-teacher cosine per position"),
                                   fig_dir / f"cosine_{stage}.png"))
    return made


def measure(run: Path, stage: str, records, num_latents: int) -> dict:
    """{setting: (accuracy, answers)} of one stage's model, without and (warm-up, stage2) with thought images."""
    model, processor = load(run / stage)
    out = {}
    for thought in (False, True) if stage != "stage3" else (False,):
        res = evaluate(model.eval(), processor, records, [num_latents], thought_images=thought, visual_cot=thought and
                       stage == "warmup", batch_size=32, max_new_tokens=6, progress=False,
                       visibility=trained_visibility(str(run / stage)))
        out["with" if thought else "without"] = (res["accuracy"][num_latents],
                                                 [p["answer"] for p in res["predictions"][num_latents]])
    return out


def main(argv: list[str] | None = None) -> None:
    args = config.parse(DemoConfig, argv, "python -m lcot.demo", __doc__)
    quiet_libraries(args.verbose)
    torch.manual_seed(0)
    t0 = time.time()
    run = Path(args.run_dir)
    tiny = build_tiny(run / "tiny", seed=0)
    data = make_dataset(run / "hops", n=args.n, seed=0, task="hops")
    train, test = Path(data["train"]), Path(data["test"])
    print(f"demo · tiny model {run / 'tiny'} · hops task {run / 'hops'} ({args.n} records)", flush=True)
    common = dict(train_jsonl=train, num_latents=args.num_latents, bsz=args.bsz, grad_accum_steps=1,
                  learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", logging_steps=10, save_steps=10_000,
                  seed=0, warmup_steps=0.03,
                  latent_grad="truncated", preprocess=True, overwrite_output_dir=True, verbose=args.verbose,
                  thought_visibility=args.thought_visibility)
    run_stage(stage="vcot", model_name_or_path=tiny, output_dir=run / "warmup", max_steps=args.warmup_steps, **common)
    print(f"teacher latents · K={args.num_latents} · from {run / 'warmup'} -> {run / 'teacher'}", flush=True)
    precompute_main(["--model_name_or_path", str(run / "warmup"), "--train_jsonl", str(train),
                     "--output_dir", str(run / "teacher"), "--k_max", str(args.num_latents), "--bsz", "32",
                     "--benefit_records", "100", *(["-v"] if args.verbose else [])])
    teacher = dict(teacher_latent_dir=run / "teacher", align_weight=1.0, align="centered")
    run_stage(stage="stage2", model_name_or_path=run / "warmup", output_dir=run / "stage2",
              max_steps=args.stage2_steps, **common, **teacher)
    run_stage(stage="stage3", model_name_or_path=run / "stage2", output_dir=run / "stage3",
              max_steps=args.stage3_steps, **common, **teacher)
    test_records = read_records(test)
    print(f"evaluation · {len(test_records)} test records · {len(STAGES)} models", flush=True)
    results = {stage: measure(run, stage, test_records, args.num_latents) for stage in STAGES}
    made = figures(run, Path(args.figures), args.num_latents, train)
    (run / "results.json").write_text(json.dumps({s: {t: a for t, (a, _) in r.items()} for s, r in results.items()},
                                                 indent=1))
    majority = majority_rate(test_records)
    names = {"warmup": "visual-CoT warm-up (the teacher)", "stage2": "stage2 (centred alignment)",
             "stage3": "stage3 (no thought images)"}
    header = ["model", f"accuracy without thought images (K={args.num_latents})", "with thought images"]
    rows = [[names[s], accuracy_cell(*r["without"], majority),
             accuracy_cell(*r["with"], majority) if "with" in r else None] for s, r in results.items()]
    print("\n" + table(header, rows))
    print(f"\n{len(test_records)} test records of 1-4 hops; majority-answer rate {majority:.3f}.")
    print(benefit_line(results["warmup"]["with"][0], results["warmup"]["without"][0],
                       "Teacher (visual-CoT warm-up)"))
    print(benefit_line(results["stage2"]["with"][0], results["stage2"]["without"][0],
                       "stage2 (thought images only through the latents)", teacher=False))
    print(f"Figures: {', '.join(str(m) for m in made)}. Took {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
