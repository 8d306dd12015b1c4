"""Probe: can the K graphed latent steps hide behind the prefix part of the pass with gradients?

    python benchmarks/overlap_probe.py --shape 3b --stage stage3      # a GPU; prints times and one verdict

Times, on the bench's model and batch (bench.py): (a) the no-gradient prefix pass and the K steps, (b) the
prefix columns' forward with gradients, and (c) both at once, the steps replayed on a side stream while the
forward runs on the main stream. If (c) is well below (a) + (b), splitting training's pass with gradients at the
slots and running the chain beside its prefix part would pay; if not, the GPU does not overlap them.
Any other flag is bench.py's (its runner's switches: --compile_step on, --kernels off, --step_attention sdpa, ...).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def timed(fn, iters: int) -> float:
    out = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="3b")
    p.add_argument("--stage", default="stage3", choices=("stage2", "stage3"))
    p.add_argument("--iters", type=int, default=7)
    a, rest = p.parse_known_args(argv)
    args = bench.parser().parse_args(["--shape", a.shape, "--batch", "2", "--latent_size", "32", "--dtype", "bf16",
                                      "--stages", a.stage, "--device", "cuda", *rest])
    args.argv, args.stages = rest, [a.stage]
    b_ = bench.Bench(args)
    b_.setup()
    from lcot.core.latent import new_cache, text_forward

    model, b = b_.model, b_.batches[a.stage]
    s, k = b["latent_start"], b["num_latents"]
    mask, pos = b["attention_mask_4d"], b["position_ids"]
    with torch.no_grad():  # the graphed recurrence is for passes without gradients
        embeds = b_.embed(b)
        steps = b_.path("graph").recurrence(model, embeds.shape[0], embeds.shape[1])
    side = torch.cuda.Stream()

    def chain() -> None:
        with torch.no_grad():
            h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
            steps.run(h[:, -1:], mask, pos, s, k)

    def prefix_grad() -> torch.Tensor:
        return text_forward(model, embeds[:, :s].detach().requires_grad_(), mask, pos, slice(0, s), new_cache(model))

    def both() -> None:
        with torch.no_grad():
            h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            steps.run(h[:, -1:], mask, pos, s, k)
        out = prefix_grad()
        torch.cuda.current_stream().wait_stream(side)
        return out

    for fn in (chain, prefix_grad, both, chain, both):  # warm-up: graph captures
        fn()
    t_chain, t_grad, t_both = timed(chain, a.iters), timed(prefix_grad, a.iters), timed(both, a.iters)
    with torch.no_grad():
        t_prefix = timed(lambda: steps.forward(embeds[:, :s], mask, pos, slice(0, s)), a.iters)
    steps_s = t_chain - t_prefix
    visible = t_both - t_prefix - t_grad  # what the steps still add when run beside the forward
    print(f"device {torch.cuda.get_device_name()}, {a.shape} {a.stage}, batch 2, K={k}, prefix {s} columns")
    print(f"(a) no-gradient prefix + K steps: {t_chain:.3f} s (prefix alone {t_prefix:.3f} s, steps {steps_s:.3f} s)")
    print(f"(b) prefix forward with gradients: {t_grad:.3f} s")
    print(f"(c) both, steps on a side stream: {t_both:.3f} s against {t_chain + t_grad:.3f} s one after the other")
    print(f"steps hidden: {1 - visible / steps_s:.0%} of their {steps_s:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
