"""Where one latent step's time goes on a GPU: its kernels by kind, against the graphed step and the weight floor.

    PYTHONPATH=. python benchmarks/step_anatomy.py --shape 3b --out runs/anatomy/b3.json
    PYTHONPATH=. python benchmarks/step_anatomy.py --shape 7b --lora --gradient_checkpointing --freeze_vision \\
        --out runs/anatomy/b7_lora.json

The model, batch and K are bench.py's (random weights, the stage2 batch). For each variant of the step it reports
the K graphed steps' time per step (median of --probe_iters runs) and, from torch.profiler over one run of the K
graphed steps (not the prefix pass before them), the kernels of one step by kind: count, time, and the GPU's idle
time between them. Kinds, from the kernels' names: `attention` (inductor's fused kernels around sdpa, repeat_kv's
copies of keys and values included, match it too), `gemm` (matrix products: the weights' and LoRA's), `copy`
(cache writes, casts), `fused` (inductor's other triton kernels), `other` (eager elementwise and reductions).
Beside them: the step's floor (bench.py's bytes over the measured copy bandwidth) and the weights' share of it.

Variants: the eager and the compiled step (--compile), in training and eval mode; with --lora also the adapters
disabled and merged into the weights (what fusing them could at best reach), and with --lora --autocast (bf16
autocast in training mode, as the trainer runs) the adapters cast in every product instead of once a chain
(a runner built with cast_adapters=False, lcot.fast.adapters); with --stock_attention also transformers' own sdpa
path for the steps (repeat_kv's copies of the cache, instead of lcot.fast.attention's grouped steps), with
--sdpa_steps sdpa's kernel for the compiled step's grouped attention (step_attention="sdpa", instead of
FlexAttention's), and with --cublas cuBLAS's products (kernels=False) instead of lcot.fast.skinny's kernels; these
three with their largest difference from the default over all K latents (in bf16 that difference grows with K
whatever the change: compare it with bench.py's numerics rows). Each variant runs on an lcot.fast.Runner of its
own, built with bench.py's runner switches (any given here: --kernels, --step_attention, ...) and the variant's
changes; the bench's runner is attached again after it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_step import busy_time  # noqa: E402 - a sibling script

KINDS = (("attention", r"flash|fmha|attention|attn|flex"),
         ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|splitk|triton_tem|_mm_|matmul|dot_kernel|skinny_kernel|shrink_kernel"),
         ("copy", r"copy|memcpy|memset|index|scatter|catarray|fill|(?<!no)cast"),
         ("fused", r"^triton"))


def kind_of(name: str) -> str:
    """The kind of a kernel, from its name (first matching pattern of KINDS, else 'other')."""
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


def anatomy(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Per step: count and microseconds of each kind, their sum, busy (union) and span (first start to last
    end) time. kernels: (name, start_us, duration_us) of `steps` steps."""
    out: dict = {k: {"count": 0.0, "us": 0.0} for k in [*(k for k, _ in KINDS), "other"]}
    for name, _, dur in kernels:
        kind = out[kind_of(name)]
        kind["count"] += 1 / steps
        kind["us"] += dur / steps
    spans = [(s, s + d) for _, s, d in kernels]
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
    return {"kinds": out, "kernels": len(kernels) / steps, "sum_us": sum(d for _, _, d in kernels) / steps,
            "busy_us": busy_time(spans) / steps, "span_us": span / steps}


def top_kernels(kernels: list[tuple[str, float, float]], steps: int, n: int = 12) -> list[tuple[str, float, float]]:
    """The n kernel names that take the most time: (name, count per step, microseconds per step)."""
    agg: dict[str, list[float]] = {}
    for name, _, dur in kernels:
        a = agg.setdefault(name, [0.0, 0.0])
        a[0] += 1 / steps
        a[1] += dur / steps
    rows = sorted(((k[:120], c, us) for k, (c, us) in agg.items()), key=lambda r: -r[2])
    return rows[:n]


@contextmanager
def attention(model, name: str | None):
    """The language model's attention implementation set to `name` for the block (None: unchanged)."""
    from lcot.fast.attention import set_text_attention

    if name is None:
        yield
        return
    old = set_text_attention(model, name)
    try:
        yield
    finally:
        set_text_attention(model, old)


@contextmanager
def adapters(model, how: str | None):
    """LoRA layers as they are (None), disabled ('off'), or merged into their weights ('merged', unmerged after)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "merge")]
    if how == "off":
        for m in layers:
            m.enable_adapters(False)
    elif how == "merged":
        for m in layers:
            m.merge()
    try:
        yield
    finally:
        for m in layers:
            if how == "off":
                m.enable_adapters(True)
            elif how == "merged":
                m.unmerge()


# -- the probe ----------------------------------------------------------------------------------------------------
def _kernels(prof) -> list[tuple[str, float, float]]:
    from torch.autograd import DeviceType

    return [(e.name, float(e.time_range.start), float(e.time_range.elapsed_us())) for e in prof.events()
            if e.device_type == DeviceType.CUDA]


def probe_variant(bench, name: str, *, compiled: bool, train: bool, lora: str | None = None,
                  attn: str | None = None, cast: bool | None = None, kernels: bool | None = None,
                  steps_attention: str | None = None, iters: int = 5) -> dict:
    """One variant: its steps' times, its profiled kernels and (in eval mode) its latents, on a runner of its own
    (bench.py's runner switches, the step compiled or not). cast=False: the adapters cast in every product (the
    runner's cast_adapters=False); kernels=False: cuBLAS's products instead of lcot.fast.skinny's (kernels=False);
    steps_attention="sdpa": sdpa's kernel in the compiled step instead of FlexAttention's (step_attention="sdpa";
    dynamo's cache is reset around it); None leaves bench.py's switch."""
    from lcot.core.model import latent_hidden_states
    from lcot.fast import Runner

    model, b, k = bench.model, bench.batches["stage2"], bench.batches["stage2"]["num_latents"]
    options = {**bench.options, "compile_step": "on" if compiled else "off"}
    for key, value in (("cast_adapters", cast), ("kernels", kernels), ("step_attention", steps_attention)):
        if value is not None:
            options[key] = value
    bench.runner.clear()
    runner = Runner(model, fast="graph", **options).attach()
    model.train(train)
    if steps_attention:
        torch._dynamo.reset()
    t0 = time.perf_counter()
    try:
        with adapters(model, lora), attention(model, attn):
            for _ in range(2):  # capture (and compile) first
                bench.chain_steps(b, runner=runner)
            warm_s = time.perf_counter() - t0
            times = [bench.chain_steps(b, runner=runner) for _ in range(iters)]
            acts = [torch.profiler.ProfilerActivity.CPU]
            if bench.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=acts)
            bench.chain_steps(b, around=prof, runner=runner)  # the K steps alone, not the prefix pass before them
            profiled = "graph"
            if bench.device.type == "cuda" and not _kernels(prof):  # a profiler that does not see into graphs
                prof = torch.profiler.profile(activities=acts)
                bench.chain_steps(b, "static", around=prof, runner=runner)
                profiled = "static (eager launches)"
            latents = None
            if not train:  # (in training mode, dropout and checkpointing make the latents another question)
                with torch.no_grad():
                    latents = latent_hidden_states(model, b, runner=bench.path("graph", runner))[1].float()
        products = "lcot.fast.skinny" if runner.kernels_active(model) else "cuBLAS"
    finally:
        runner.clear()
        bench.runner.attach()  # the bench's own runner and attention functions again
        if steps_attention:
            torch._dynamo.reset()
    kern = _kernels(prof)
    row = {"variant": name, "compiled": compiled, "train": train, "lora": lora,
           "attention": attn or steps_attention or "default", "products": products,
           "step_ms": statistics.median(times) / k * 1e3, "steps_ms": [t / k * 1e3 for t in times],
           "warm_s": round(warm_s, 1), "profiled_kernels": len(kern),
           "profiled": profiled}
    if kern:
        row.update(anatomy(kern, k))
        row["top"] = top_kernels(kern, k)
    compile_note = runner.compile_errors[-1][:200] if compiled and runner.compile_errors else ""
    if compile_note:
        row["note"] = "COMPILED STEP FAILED: " + compile_note
    return row, latents


def variants(args) -> list[dict]:
    """The variants asked for (--compile, --lora, --stock_attention, --cublas), filtered by --variants (fnmatch
    patterns)."""
    from fnmatch import fnmatch

    out = []
    for compiled in ([False, True] if args.compile == "both" else [args.compile == "on"]):
        tag = "compiled" if compiled else "eager"
        out.append(dict(name=f"{tag} train", compiled=compiled, train=True))
        out.append(dict(name=f"{tag} eval", compiled=compiled, train=False))
        if args.lora:
            out.append(dict(name=f"{tag} train + adapters off", compiled=compiled, train=True, lora="off"))
            out.append(dict(name=f"{tag} train + adapters merged", compiled=compiled, train=True, lora="merged"))
            if args.autocast:  # the adapters' weights cast in every product, as without lcot.fast.adapters
                out.append(dict(name=f"{tag} train + per-call casts", compiled=compiled, train=True, cast=False))
        if args.stock_attention:
            out.append(dict(name=f"{tag} eval + transformers' attention", compiled=compiled, train=False,
                            attn="sdpa"))
        if args.sdpa_steps and compiled:
            out.append(dict(name=f"{tag} eval + sdpa's kernel", compiled=compiled, train=False,
                            steps_attention="sdpa"))
        if args.cublas:
            out.append(dict(name=f"{tag} train + cuBLAS", compiled=compiled, train=True, kernels=False))
            out.append(dict(name=f"{tag} eval + cuBLAS", compiled=compiled, train=False, kernels=False))
    pats = [v.strip() for v in args.variants.split(",") if v.strip()]
    return [v for v in out if not pats or any(fnmatch(v["name"], pat) for pat in pats)]


def markdown(env: dict, floor_ms: float, weights_ms: float, rows: list[dict]) -> str:
    kinds = [*(k for k, _ in KINDS), "other"]
    lines = [f"{env['device']}, {env['shape']}{' LoRA' if env['lora'] else ''}, batch {env['batch']}, "
             f"K={env['num_latents']}, commit {env['commit']}: floor {floor_ms:.2f} ms a step "
             f"(weights alone {weights_ms:.2f} ms)", "",
             "| variant | step (ms) | kernels | kernel sum (ms) | idle (ms) | "
             + " | ".join(f"{k} (n, ms)" for k in kinds) + " | diff vs default |",
             "|---|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for r in rows:
        if "kinds" in r:
            cells = [f"{r['kinds'][k]['count']:.0f}, {r['kinds'][k]['us'] / 1e3:.2f}" for k in kinds]
            head = [f"{r['kernels']:.0f}", f"{r['sum_us'] / 1e3:.2f}", f"{(r['span_us'] - r['busy_us']) / 1e3:.2f}"]
        else:
            cells, head = ["" for _ in kinds], ["no CUDA kernels", "", ""]
        diff = f"{r['diff']:.2e}" if r.get("diff") is not None else ""
        lines.append(f"| {r['variant']} | {r['step_ms']:.2f} | " + " | ".join(head + cells) + f" | {diff} |"
                     + (f" {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import bench as B

    p = argparse.ArgumentParser(prog="python benchmarks/step_anatomy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", choices=["off", "on", "both"], default="both")
    p.add_argument("--stock_attention", action="store_true",
                   help="also transformers' sdpa path for the steps (eval mode; lcot.fast.attention's is the default)")
    p.add_argument("--sdpa_steps", action="store_true",
                   help="also sdpa's kernel for the compiled steps' grouped attention (a runner with "
                   "step_attention='sdpa'; FlexAttention's decoding kernel is the default)")
    p.add_argument("--cublas", action="store_true",
                   help="also cuBLAS's products for the steps (a runner with kernels=False; lcot.fast.skinny's "
                   "kernels are the default)")
    p.add_argument("--variants", default="", help="only these variants (comma-separated fnmatch patterns of their "
                   "names, e.g. 'eager*,compiled train')")
    p.add_argument("--probe_iters", type=int, default=5)
    p.add_argument("--out", help="write the rows here (.json; and a .md beside it)")
    own, rest = p.parse_known_args(argv)
    args = B.parser().parse_args(rest + ["--no-fp32_check"])
    args.argv = rest
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.stages, args.rows = ["stage2"], []
    own.lora, own.autocast = args.lora, args.autocast
    bench = B.Bench(args)
    bench.setup()
    bw = B.copy_bandwidth(bench.device) if bench.device.type == "cuda" else float("nan")
    floor_s, total = B.step_floor(bench.model, bench.batches["stage2"], bw)
    kv = B.step_bytes(bench.model, args.batch, 0)  # the weights alone
    floor_ms, weights_ms = floor_s * 1e3, kv / bw * 1e3
    rows, ref = [], {}
    for v in variants(own):
        name = v.pop("name")
        row, lat = probe_variant(bench, name, iters=own.probe_iters, **v)
        key = (v["compiled"], v["train"])
        changed = any(v.get(x) is not None for x in ("attn", "kernels", "steps_attention"))
        if changed and lat is not None and (v["compiled"], False) in ref:
            row["diff"] = float((lat - ref[(v["compiled"], False)]).abs().max())
        elif not changed and not v.get("lora") and lat is not None:
            ref[key] = lat
        rows.append(row)
        print(json.dumps({k: r for k, r in row.items() if k != "top"}), file=sys.stderr, flush=True)
    meta = {**bench.env, "bandwidth_Bps": bw, "step_bytes": total, "weight_bytes": kv}
    table = markdown(meta, floor_ms, weights_ms, rows)
    print(table)
    for r in rows:
        for name, c, us in r.get("top", [])[:6]:
            print(f"  {r['variant']}: {c:.0f} x {name[:90]}: {us / 1e3:.3f} ms", file=sys.stderr)
    if own.out:
        out = Path(own.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"env": meta, "floor_ms": floor_ms, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
