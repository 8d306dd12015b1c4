"""What `--compile_step auto` (the default on a GPU) costs up front, and what it saves a step.

For each sequence length in turn (each a new static-cache bucket), one chain of K graphed latent steps after its
prefix, timed the first time (compile, warm-up and capture included) and then as the median of --iters more; with
the eager step and with the compiled one, each in its own pass over the lengths on a fresh model state. The
first length compiles the step for static shapes, the second recompiles it with a dynamic cache length (torch's
default), later ones should reuse that. Random weights, random inputs, a causal mask.

    PYTHONPATH=. python benchmarks/compile_cost.py --shape 3b --lengths 960,1300,1700 --out runs/compile_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BENCH_SHAPES, build_model, make_config, make_processor, source_commit  # noqa: E402

from lcot.core import graph  # noqa: E402
from lcot.core.latent import _COMPILED_STEP  # noqa: E402


def chain(model, batch: int, length: int, k: int) -> float:
    """Seconds for one prefix of length - k columns and k latent steps through the kept FastLatents."""
    dev, hidden = model.device, model.config.text_config.hidden_size
    start = length - k
    torch.manual_seed(length)
    x = torch.randn(batch, start, hidden, device=dev, dtype=model.dtype)
    mask = torch.ones(length, length, device=dev, dtype=torch.bool).tril()[None, None].expand(batch, 1, -1, -1)
    pos = torch.arange(length, device=dev)[None, None].expand(3, batch, -1)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        fl = graph.fast_latents(model, batch, length)
        pre = fl.forward(x, mask, pos, slice(0, start))
        fl.run(pre[:, -1:], mask, pos, start, k)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def one_setting(model, setting: str, lengths: list[int], batch: int, k: int, iters: int) -> list[dict]:
    graph.clear(model)
    _COMPILED_STEP.pop(model, None)
    torch._dynamo.reset()
    graph.step_compile(model, setting)
    rows = []
    for n in lengths:
        first = chain(model, batch, n, k)
        times = [chain(model, batch, n, k) for _ in range(iters)]
        steady = statistics.median(times)
        rows.append({"setting": setting, "length": n, "bucket": graph.bucket(n), "first_s": round(first, 3),
                     "steady_s": round(steady, 4), "overhead_s": round(first - steady, 3),
                     "step_ms": round(1e3 * steady / k, 3), "compiled": model in _COMPILED_STEP})
        print(json.dumps(rows[-1]), flush=True)
    graph.step_compile(model, "off")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=BENCH_SHAPES, default="3b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--lengths", default="960,1300,1700", help="sequence lengths, one cache bucket each")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", help="write the rows here (JSON)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("compile_cost.py times CUDA graphs: it needs a GPU")
    dev = torch.device("cuda")
    tok = make_processor(448).tokenizer
    model = build_model(make_config(args.shape, tok), dev, torch.bfloat16).eval()
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = [r for s in ("off", "auto") for r in one_setting(model, s, lengths, args.batch, args.latent_size,
                                                          args.iters)]
    env = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "commit": source_commit(),
           "shape": args.shape, "batch": args.batch, "k": args.latent_size,
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
