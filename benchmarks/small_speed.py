"""Small-model training throughput: stage2 of an 8M model on the hops task, records/s.

    python benchmarks/small_speed.py --out runs/small_speed          # a GPU; prints a markdown table

Every row runs lcot.main's stage2 (align_weight 0, truncated gradient, K=4, batch 64) in its own process, with
the same environment on the same card, one after the other:
  * baseline: the kit's original data path: images decoded and processed in the main process for every
    batch (--dataloader_num_workers 0), and transformers' per-image vision loops (the runner built with
    vision=False: `python benchmarks/small_speed.py lcot.main --no_vision -- FLAGS`, below);
  * cached: `--preprocess` (every record's tokens, positions and exact uint8 pixel codes built once,
    before training; decoded on the GPU), DataLoader workers, and the vision tower without per-image
    loops (lcot.fast.vision; `python -m lcot.main` itself);
  * --graph_pass (optional): the cached row with the pass with gradients as CUDA graphs (lcot.fast.graph).
records/s is the Trainer's train_samples_per_second (the training loop only); the one-off preprocessing
time is reported beside it. CPU dry run: --shape tiny --steps 4 --n 200.

    python benchmarks/small_speed.py lcot.main [--no_vision] -- FLAGS

runs `python -m lcot.main FLAGS` in this process with its runner (lcot.fast.Runner) also given the
keywords lcot.main has no flag for: --no_vision builds it with vision=False.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def steady_rate(text: str, steps: int, bsz: int) -> float | None:
    """records/s from the training bar between a quarter of the steps and the end (start-up and one-off
    compilation excluded); None when the bar has too few points."""
    points = [(int(n), int(m) * 60 + int(s)) for n, m, s in
              re.findall(rf"(\d+)/{steps} \[(\d+):(\d+)<", text.replace("\r", "\n"))]
    later = [p for p in points if p[0] >= steps // 4]
    if len(later) < 2 or later[-1][1] <= later[0][1]:
        return None
    return (later[-1][0] - later[0][0]) * bsz / (later[-1][1] - later[0][1])


def lcot_main(argv: list[str]) -> None:
    """`python -m lcot.main` in this process, its runner built with the keywords of this script's own flags too."""
    p = argparse.ArgumentParser(prog="python benchmarks/small_speed.py lcot.main",
                                description=lcot_main.__doc__)
    p.add_argument("--no_vision", dest="vision", action="store_false",
                   help="the runner's vision=False: transformers' vision tower (per-image loops)")
    own, rest = p.parse_known_args(argv)
    from lcot.pipeline import load as load_mod
    from lcot.pipeline.train import main as train_main

    options = {} if own.vision else {"vision": False}
    real = load_mod.attach_runner

    def attach_runner(model, speed=None, **kwargs):
        return real(model, speed, **kwargs, **options)

    load_mod.attach_runner = attach_runner  # lcot.pipeline.load.load gives the model its runner through it
    train_main([a for a in rest if a != "--"])


def run(argv: list[str], log: Path, runner_flags: tuple[str, ...] = ()) -> tuple[float, float, str, float | None]:
    """One row: `python -m ARGV` (ARGV: lcot.main and its flags), or with runner_flags through `lcot_main`."""
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", *argv] if not runner_flags else \
        [sys.executable, str(Path(__file__).resolve()), argv[0], *runner_flags, "--", *argv[1:]]
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    text = log.read_text()
    if rc:
        raise SystemExit(f"{' '.join(argv)} failed (rc {rc}); see {log}")
    rate = float(re.findall(r"'train_samples_per_second': '?([0-9.]+)", text)[-1])
    prep = re.findall(r"preprocess records: 100%.*?\[(\d+):(\d+)<", text)
    prep_s = int(prep[-1][0]) * 60 + int(prep[-1][1]) if prep else 0.0
    steps, bsz = int(argv[argv.index("--max_steps") + 1]), int(argv[argv.index("--bsz") + 1])
    steady = steady_rate(text, steps, bsz)
    return rate, prep_s, f"{time.time() - t0:.0f}", steady


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/small_speed")
    p.add_argument("--shape", default="8m")
    p.add_argument("--n", type=int, default=6000, help="hops records (a fifth held out)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of the cached row")
    p.add_argument("--baseline_steps", type=int, default=40)
    p.add_argument("--compile_steps", type=int, default=0, help="optimizer steps of the --compile row (0: --steps)")
    p.add_argument("--bsz", type=int, nargs="+", default=[64], help="batch sizes (each gets both rows)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cached rows")
    p.add_argument("--graph_pass", action="store_true",
                   help="also a row with --graph_pass (the pass with gradients as CUDA graphs)")
    p.add_argument("--no_baseline", action="store_true", help="skip the baseline row (rows then show no ratio)")
    p.add_argument("--compile", action="store_true",
                   help="also a row with --compile, after a 10-step run that fills the compile cache")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.check_call([sys.executable, "-m", "lcot.toy.tiny", "--shape", args.shape, "--output_dir",
                           str(out / "model")])
    subprocess.check_call([sys.executable, "-m", "lcot.toy.synthetic", "--task", "hops", "--n", str(args.n),
                           "--output_dir", str(out / "data")], stderr=subprocess.DEVNULL)
    common = ["lcot.main", "--stage", "stage2", "--align_weight", "0", "--latent_grad", "truncated",
              "--latent_size", "4", "--model_name_or_path", str(out / "model"), "--train_jsonl",
              str(out / "data" / "train.jsonl"), "--grad_accum_steps", "1", "--learning_rate", "1e-3",
              "--save_steps", "100000", "--logging_steps", "1000", "--overwrite_output_dir",
              "--verbose"]  # transformers' own bars and final log line, which the rates are read from
    rows = {}
    for bsz in args.bsz:  # the same number of records per row at every batch size
        steps, base_steps = max(1, args.steps * 64 // bsz), max(1, args.baseline_steps * 64 // bsz)
        if not args.no_baseline:
            rows[("baseline", bsz)] = run([*common, "--bsz", str(bsz), "--output_dir", str(out / "baseline"),
                                           "--max_steps", str(base_steps)], out / f"baseline_{bsz}.log",
                                          runner_flags=("--no_vision",))
        cached = [*common, "--bsz", str(bsz), "--output_dir", str(out / "cached"), "--max_steps", str(steps),
                  "--preprocess", "--dataloader_num_workers", str(args.workers)]
        rows[("cached", bsz)] = run(cached, out / f"cached_{bsz}.log")
        if args.graph_pass:
            rows[("cached + --graph_pass", bsz)] = run([*cached, "--graph_pass"], out / f"graph_pass_{bsz}.log")
        if args.compile:  # a short run first fills torch.compile's on-disk cache, as any earlier run would
            warm = [*cached, "--compile"]
            warm[warm.index("--max_steps") + 1] = "10"
            try:
                run(warm, out / f"compile_warmup_{bsz}.log")
                compiled = [*cached, "--compile"]
                if args.compile_steps:
                    compiled[compiled.index("--max_steps") + 1] = str(max(1, args.compile_steps * 64 // bsz))
                rows[("cached + --compile", bsz)] = run(compiled, out / f"compiled_{bsz}.log")
            except SystemExit as err:  # report the other rows anyway
                print(f"the --compile row failed: {err}", file=sys.stderr)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [f"stage2, {args.shape} model, hops task, K=4, truncated gradient, fp32; {device}", "",
             "| path | batch | records/s (Trainer, whole loop) | vs baseline (same batch) "
             "| records/s, steady (last 3/4 of the steps) | one-off preprocessing | wall s |",
             "|---|---|---|---|---|---|---|"]
    for (name, bsz), (rate, prep, wall, steady) in rows.items():
        base = rows.get(("baseline", bsz), (None,))[0]
        lines.append(f"| {name} | {bsz} | {rate:.0f} | {f'{rate / base:.1f}x' if base else '-'} | "
                     f"{f'{steady:.0f}' if steady else '-'} | {prep:.0f} s | {wall} |")
    text = "\n".join(lines) + "\n"
    (out / "small_speed.md").write_text(text)
    (out / "small_speed.json").write_text(json.dumps({"device": device, "args": vars(args),
                                                     "rows": [[*k, *v] for k, v in rows.items()]}, indent=1))
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["lcot.main"]:
        lcot_main(sys.argv[2:])
    else:
        main()
