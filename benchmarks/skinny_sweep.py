"""lcot.fast.skinny's kernel against cuBLAS on the projections of a latent step, per tile configuration.

    PYTHONPATH=. python benchmarks/skinny_sweep.py --out runs/skinny/sweep.json

For each weight shape of the 3B and 7B language models (q/o, k/v, gate/up, down; LoRA's expand folded in or not)
and each row count, it times cuBLAS (F.linear, plus peft's two adapter products and the add for LoRA) and the
kernel under every configuration of --configs, and reports the best configuration, its time, the rate it reads
the weight at as a share of the card's copy bandwidth (bench.py's: bytes read and written by a copy, per second)
and its ratio to cuBLAS. Timing: a CUDA graph of 32 calls, cycling over copies of the
weights that together exceed the L2 cache (as in a step, where every layer's weights come from memory); median
of 7 replays. It also checks the kernel's values: fp32 (exact products) against F.linear, bf16 against an fp32
product of the same inputs, beside cuBLAS's bf16 error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {  # name -> (N, K) of each projection of one layer
    "3b": {"q_o": (2048, 2048), "k_v": (256, 2048), "gate_up": (11008, 2048), "down": (2048, 11008)},
    "7b": {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (18944, 3584), "down": (3584, 18944)},
}
CONFIGS = [(bn, bk, w, s) for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6))]
L2_SPAN = 512 << 20  # bytes of weights cycled through per timing


def timed(fn, calls: int = 32, reps: int = 7) -> float:
    """Median seconds of one call of fn(i) (i: which weight copy), from a CUDA graph of `calls` calls."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def check(n: int, k: int, r: int) -> dict:
    """The kernel's largest errors: fp32 against F.linear; bf16 (and cuBLAS's bf16) against fp32 products."""
    from lcot.fast.skinny import skinny_linear

    g = torch.Generator(device="cuda").manual_seed(n + k)
    x, w = torch.randn(2, k, device="cuda", generator=g), torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    a, u = torch.randn(r, k, device="cuda", generator=g) / k ** 0.5, torch.randn(n, r, device="cuda", generator=g)
    want = F.linear(x, w) + 0.5 * F.linear(F.linear(x, a), u)
    got32 = skinny_linear(x, w, None, x, a, u, 0.5)
    h = [v.bfloat16() for v in (x, w, a, u)]
    ref = F.linear(h[0].float(), h[1].float()) + 0.5 * F.linear(F.linear(h[0].float(), h[2].float()), h[3].float())
    got16 = skinny_linear(h[0], h[1], None, h[0], h[2], h[3], 0.5).float()
    cublas16 = (F.linear(h[0], h[1]) + 0.5 * F.linear(F.linear(h[0], h[2]), h[3])).float()
    return {"fp32_max_err": float((got32 - want).abs().max()), "bf16_max_err": float((got16 - ref).abs().max()),
            "cublas_bf16_max_err": float((cublas16 - ref).abs().max()), "scale": float(ref.abs().max())}


def sweep_shape(n: int, k: int, rows: int, lora: int, configs: list, bw: float) -> dict:
    from lcot.fast import skinny_kernel

    dt = torch.bfloat16
    copies = max(2, L2_SPAN // (n * k * 2))
    ws = [torch.randn(n, k, device="cuda", dtype=dt) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=dt)
    a = torch.randn(lora or 16, k, device="cuda", dtype=dt) / k ** 0.5
    u = torch.randn(n, lora or 16, device="cuda", dtype=dt) / 4
    out = torch.empty(rows, n, device="cuda", dtype=dt)
    pick = lambda i: ws[i % copies]  # noqa: E731

    if lora:
        def cublas(i):
            return F.linear(x, pick(i)) + F.linear(F.linear(x, a), u) * 0.5
    else:
        def cublas(i):
            return F.linear(x, pick(i))
    base = timed(cublas)
    res = {"n": n, "k": k, "rows": rows, "lora": lora, "cublas_us": base * 1e6,
           "bytes": n * k * 2, "cublas_bw": n * k * 2 / base / bw, "configs": {}}
    for cfg in configs:
        def ours(i, cfg=cfg):
            skinny_kernel.launch(x, pick(i), None, x, a if lora else None, u if lora else None, 0.5, out, cfg)
        try:
            res["configs"][str(cfg)] = timed(ours) * 1e6
        except Exception as err:  # noqa: BLE001 - a config that does not compile is skipped, named
            res["configs"][str(cfg)] = f"{type(err).__name__}: {str(err)[:120]}"
    good = {c: v for c, v in res["configs"].items() if isinstance(v, float)}
    best = min(good, key=good.get)
    res.update(best=best, best_us=good[best], ratio=good[best] / (base * 1e6),
               best_bw=n * k * 2 / (good[best] / 1e6) / bw)
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/skinny_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="3b,7b")
    p.add_argument("--rows", default="2,16")
    p.add_argument("--lora", type=int, default=16, help="LoRA rank of the 7B rows with an adapter (0: none)")
    p.add_argument("--configs", type=int, default=0, help="only the first N configurations (0: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("skinny_sweep.py needs a CUDA device")
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import copy_bandwidth

    bw = copy_bandwidth(torch.device("cuda"))  # read + write, as bench.py's floor
    configs = CONFIGS[:args.configs] if args.configs else CONFIGS
    results = []
    for shape in args.shapes.split(","):
        for name, (n, k) in SHAPES[shape].items():
            for rows in (int(r) for r in args.rows.split(",")):
                for lora in ([0, args.lora] if shape == "7b" and args.lora else [0]):
                    r = sweep_shape(n, k, rows, lora, configs, bw)
                    r.update(shape=shape, proj=name, **check(n, k, args.lora or 16))
                    results.append(r)
                    print(f"{shape} {name} rows={rows} lora={lora}: cuBLAS {r['cublas_us']:.1f} us "
                          f"({r['cublas_bw']:.0%}), best {r['best']} {r['best_us']:.1f} us ({r['best_bw']:.0%}), "
                          f"ratio {r['ratio']:.2f}; fp32 err {r['fp32_max_err']:.1e}, bf16 err "
                          f"{r['bf16_max_err']:.1e} (cuBLAS {r['cublas_bf16_max_err']:.1e})", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "bandwidth_Bps": bw, "torch": torch.__version__}
    out.write_text(json.dumps({"env": meta, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
