"""`make demo`: the whole method on the embedded default (tiny offline model, bundled shapes data).

tiny model + dataset -> stage1 -> teacher latents -> stage2 -> stage3 -> evaluation, figures under
figures/, and one table: accuracy without thought images after each stage, the thought-image
setting, and the mean latent-teacher cosine. The numbers of a 1M-parameter random model are small;
they are real. The same calls run a real checkpoint (see README).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lcot import plots
from lcot.collate import Collator
from lcot.data import read_records
from lcot.evaluate import evaluate, majority_rate, table
from lcot.load import load
from lcot.main import run_stage
from lcot.precompute_teacher_latents import main as precompute_main
from lcot.synthetic import generate as make_dataset
from lcot.tiny import build_tiny
from lcot.trainer import read_metrics

DEFAULTS = dict(n=240, k=6, epochs1=6, epochs2=4, epochs3=6, bsz=8, lr=2e-3)


def figure_mask(model_dir: Path, jsonl: Path, k: int, out: Path) -> Path:
    model, processor = load(model_dir)
    batch = Collator(processor, model.config, k, thought_images=True)(read_records(jsonl)[:1])
    ax = plots.plot_mask(batch["attention_mask_4d"][0, 0], batch["segments"][0],
                         title=f"stage2 mask of record 0 (K={k}): only latents see the thought images")
    return plots.save(ax, out)


def figures(run: Path, fig_dir: Path, k: int, jsonl: Path) -> list[Path]:
    made = [figure_mask(run / "stage1", jsonl, k, fig_dir / "mask_stage2.png")]
    for stage in ("stage1", "stage2", "stage3"):
        rows = read_metrics(run / stage)
        made.append(plots.save(plots.plot_losses(rows, f"{stage} loss"), fig_dir / f"loss_{stage}.png"))
        if stage != "stage1":
            made.append(plots.save(plots.plot_cosine(rows, f"{stage}: latent-teacher cosine per position"),
                                   fig_dir / f"cosine_{stage}.png"))
    return made


def final_cosine(run_dir: Path) -> float:
    rows = [r for r in read_metrics(run_dir) if "cos" in r]
    return rows[-1]["cos"] if rows else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lcot.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo", help="where the model, data, checkpoints and teacher go")
    p.add_argument("--figures", default="figures", help="where the PNG figures go")
    for key, val in DEFAULTS.items():
        p.add_argument(f"--{key}", type=type(val), default=val)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    run = Path(args.run_dir)
    tiny = build_tiny(run / "tiny", seed=0)
    data = make_dataset(run / "data", n=args.n, seed=0)
    train, test = Path(data["train"]), Path(data["test"])
    common = dict(train_jsonl=train, latent_size=args.k, bsz=args.bsz, grad_accum_steps=1, lr=args.lr,
                  logging_steps=5, save_steps=10_000, seed=0, warmup_ratio=0.05, overwrite_output_dir=True)
    run_stage(stage="stage1", model_name_or_path=tiny, output_dir=run / "stage1", epochs=args.epochs1, **common)
    precompute_main(["--model_name_or_path", str(run / "stage1"), "--train_jsonl", str(train),
                     "--output_dir", str(run / "teacher"), "--k_max", str(args.k), "--bsz", "8"])
    teacher = dict(teacher_latent_dir=run / "teacher", align_weight=1.0)
    run_stage(stage="stage2", model_name_or_path=run / "stage1", output_dir=run / "stage2", epochs=args.epochs2,
              **common, **teacher)
    run_stage(stage="stage3", model_name_or_path=run / "stage2", output_dir=run / "stage3", epochs=args.epochs3,
              **common, **teacher)
    test_records = read_records(test)
    results = {}
    for stage in ("stage1", "stage2", "stage3"):
        model, processor = load(run / stage)
        res = {"without": evaluate(model.eval(), processor, test_records, [args.k], batch_size=16,
                                   max_new_tokens=8)["accuracy"][args.k]}
        if stage != "stage1":
            res["with"] = evaluate(model, processor, test_records, [args.k], thought_images=True, batch_size=16,
                                   max_new_tokens=8)["accuracy"][args.k]
            res["cos"] = final_cosine(run / stage)
        results[stage] = res
    made = figures(run, Path(args.figures), args.k, train)
    (run / "results.json").write_text(json.dumps(results, indent=1))
    header = ["after", f"acc. without thought images (K={args.k})", "acc. with thought images",
              "latent-teacher cosine (train)"]
    print("\n" + table(header, [[stage, r["without"], r.get("with"), r.get("cos")] for stage, r in results.items()]))
    print(f"\n{len(test_records)} test records; chance of always answering the most common count: "
          f"{majority_rate(test_records):.3f}. Figures: {', '.join(str(m) for m in made)}. "
          f"Took {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
