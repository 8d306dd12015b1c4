"""Checks used by benchmarks/multi_gpu.sh (plain Python, no GPU needed).

    python benchmarks/check.py losses RUN_A RUN_B [--tol 0.02] [--log-a A.log --log-b B.log]
    python benchmarks/check.py teacher TEACHER_DIR TRAIN_JSONL --k_max K

`losses`: the per-step training loss of two runs (latent_metrics.jsonl in each output dir, written by
lcot's trainer with --logging_steps 1), side by side, with the largest relative difference, and the
throughput of each (train_samples_per_second from the Trainer's final log line, when a log is given).
`teacher`: the teacher folder holds exactly one complete, readable file per record and nothing else
(no temporary files left by a writer).
Exit status 0 when the check passes, 1 when it fails, 2 when an input is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

METRICS = "latent_metrics.jsonl"


def read_losses(run: Path) -> dict[int, float]:
    path = run / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (did the run log with --logging_steps 1?)")
    losses = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if "loss" in row and "step" in row:
            losses[int(row["step"])] = float(row["loss"])  # a resumed run logs a step again: the later wins
    return losses


def throughput(log: Path | None) -> str:
    if log is None or not log.is_file():
        return "n/a"
    found = re.findall(r"train_samples_per_second['\"]?\s*[:=]\s*'?([0-9.]+)", log.read_text(errors="replace"))
    return f"{float(found[-1]):.2f} samples/s" if found else "n/a"


def losses(args) -> int:
    a, b = read_losses(Path(args.run_a)), read_losses(Path(args.run_b))
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"no common logged steps: {sorted(a)} vs {sorted(b)}")
        return 1
    print(f"{'step':>5} {'loss A':>12} {'loss B':>12} {'rel diff':>10}")
    worst = 0.0
    for s in steps:
        rel = abs(a[s] - b[s]) / max(abs(a[s]), 1e-12)
        worst = max(worst, rel)
        print(f"{s:>5} {a[s]:>12.6f} {b[s]:>12.6f} {rel:>10.2e}")
    first = abs(a[steps[0]] - b[steps[0]]) / max(abs(a[steps[0]]), 1e-12)
    ok = worst <= args.tol
    print(f"A = {args.run_a} ({throughput(Path(args.log_a) if args.log_a else None)})")
    print(f"B = {args.run_b} ({throughput(Path(args.log_b) if args.log_b else None)})")
    print(f"steps compared: {len(steps)} (A logged {len(a)}, B logged {len(b)}); relative difference at step "
          f"{steps[0]}: {first:.2e}; max over steps: {worst:.2e}; tolerance {args.tol:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def teacher(args) -> int:
    import torch

    from lcot.pipeline.data import read_records
    from lcot.pipeline.teacher import FILE_PATTERN, teacher_file

    folder = Path(args.teacher_dir)
    records = read_records(args.train_jsonl, need_thought_images=True, skip_missing_thought=True)
    expected = {teacher_file(folder, r.idx).name: r for r in records}
    present = sorted(p.name for p in folder.iterdir())
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    bad = []
    for name, rec in expected.items():
        if name in missing:
            continue
        try:
            data = torch.load(folder / name, map_location="cpu", weights_only=True)
            lat = data["latents"]
            if data.get("record_digest") != rec.digest or data.get("idx") != rec.idx or lat.shape[0] != args.k_max \
                    or not torch.isfinite(lat.float()).all():
                bad.append(name)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a failure
            bad.append(f"{name} ({type(err).__name__})")
    ok = not (missing or extra or bad)
    print(f"teacher folder {folder}: {len(present)} entries for {len(expected)} records "
          f"(pattern {FILE_PATTERN}); missing {len(missing)}, extra/temporary {len(extra)}, bad {len(bad)}: "
          f"{'PASS' if ok else 'FAIL'}")
    for label, names in (("missing", missing), ("extra", extra), ("bad", bad)):
        if names:
            print(f"  {label}: {names[:10]}{' ...' if len(names) > 10 else ''}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("losses")
    lo.add_argument("run_a")
    lo.add_argument("run_b")
    lo.add_argument("--tol", type=float, default=0.02, help="max relative loss difference over the steps")
    lo.add_argument("--log-a", dest="log_a")
    lo.add_argument("--log-b", dest="log_b")
    te = sub.add_parser("teacher")
    te.add_argument("teacher_dir")
    te.add_argument("train_jsonl")
    te.add_argument("--k_max", type=int, required=True)
    args = p.parse_args(argv)
    try:
        return losses(args) if args.cmd == "losses" else teacher(args)
    except FileNotFoundError as err:
        print(f"check: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
