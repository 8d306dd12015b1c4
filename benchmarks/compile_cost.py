"""What `--compile_step auto` (the default on a GPU) costs up front, and what it saves a step.

For each sequence length in turn (each a new static-cache bucket), one chain of K graphed latent steps after its
prefix, timed the first time (compile, warm-up and capture included) and then as the median of --iters more; with
the eager step (--compile_step off) and with the compiled one (auto), each in its own pass over the lengths with a
fresh lcot.fast.Runner (attached as lcot.pipeline.load attaches one: lcot's step attention) and dynamo reset. The
first length compiles the step for static shapes, the second recompiles it with a dynamic cache length (torch's
default), later ones should reuse that. Random weights, random inputs, a causal mask. --kernels and
--step_attention build the runners as bench.py's switches of the same names do.

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
from bench import BENCH_SHAPES, KERNELS, build_model, make_config, make_processor, source_commit  # noqa: E402

from lcot.fast import Runner  # noqa: E402
from lcot.fast.graph import bucket  # noqa: E402


def chain(runner: Runner, model, batch: int, length: int, k: int) -> float:
    """Seconds for one prefix of length - k columns and k graphed latent steps through the runner's kept
    FastLatents."""
    dev, hidden = model.device, model.config.text_config.hidden_size
    start = length - k
    torch.manual_seed(length)
    x = torch.randn(batch, start, hidden, device=dev, dtype=model.dtype)
    mask = torch.ones(length, length, device=dev, dtype=torch.bool).tril()[None, None].expand(batch, 1, -1, -1)
    pos = torch.arange(length, device=dev)[None, None].expand(3, batch, -1)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        fl = runner.fast_latents(model, batch, length, graph=True)
        pre = fl.forward(x, mask, pos, slice(0, start))
        fl.run(pre[:, -1:], mask, pos, start, k)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def one_setting(model, setting: str, lengths: list[int], batch: int, k: int, iters: int, **options) -> list[dict]:
    """The lengths in turn with a fresh runner of --compile_step `setting` (options: its other keywords)."""
    torch._dynamo.reset()
    runner = Runner(model, fast="graph", compile_step=setting, **options).attach()
    rows = []
    for n in lengths:
        first = chain(runner, model, batch, n, k)
        times = [chain(runner, model, batch, n, k) for _ in range(iters)]
        steady = statistics.median(times)
        rows.append({"setting": setting, "length": n, "bucket": bucket(n), "first_s": round(first, 3),
                     "steady_s": round(steady, 4), "overhead_s": round(first - steady, 3),
                     "step_ms": round(1e3 * steady / k, 3), "compiled": runner.step_compiled(model),
                     "errors": runner.capture_errors + runner.compile_errors + runner.kernel_errors})
        print(json.dumps(rows[-1]), flush=True)
    runner.clear()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=BENCH_SHAPES, default="3b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent_size", type=int, default=32)
    p.add_argument("--lengths", default="960,1300,1700", help="sequence lengths, one cache bucket each")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--kernels", choices=["on", "off"], default="on",
                   help="lcot.fast.skinny's kernels in the steps' graphs (off: cuBLAS's products)")
    p.add_argument("--step_attention", choices=["flex", "sdpa", "stock"], default="flex",
                   help="the steps' attention: grouped, in FlexAttention or sdpa's kernel, or transformers' sdpa")
    p.add_argument("--out", help="write the rows here (JSON)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("compile_cost.py times CUDA graphs: it needs a GPU")
    dev = torch.device("cuda")
    tok = make_processor(448).tokenizer
    model = build_model(make_config(args.shape, tok), dev, torch.bfloat16).eval()
    lengths = [int(n) for n in args.lengths.split(",")]
    options = {"kernels": KERNELS[args.kernels], "step_attention": args.step_attention}
    rows = [r for s in ("off", "auto") for r in one_setting(model, s, lengths, args.batch, args.latent_size,
                                                          args.iters, **options)]
    env = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "commit": source_commit(),
           "shape": args.shape, "batch": args.batch, "k": args.latent_size, "runner": options,
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
