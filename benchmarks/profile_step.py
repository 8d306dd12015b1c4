"""Where a training step of a small model spends its time: host dispatch, GPU kernels, and host-device syncs.

    python benchmarks/profile_step.py --model runs/small_speed/model --train_jsonl runs/small_speed/data/train.jsonl

Runs `lcot.main`'s stage2 (cached records, align_weight 0, truncated gradient, K=4) in this process and, over
--profile_steps optimizer steps after --skip steps, reports per step: wall time, the GPU's busy time (the
union of its kernel intervals), kernel launches, CUDA graph replays, and the host calls that wait for the GPU
(stream/device synchronisations and device-to-host copies). Then one more step runs under
`torch.cuda.set_sync_debug_mode("warn")` and every synchronising call is listed with the lcot or transformers
line that made it. A small model on a GPU is host-bound when the busy share is low: fewer ops, not faster
kernels, make it faster. On a CPU it runs the same steps and reports what it can (no kernels, no syncs).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _caller(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame in lcot or transformers (what made the call), else the innermost frame."""
    for frame in reversed(stack):
        if ("/lcot/" in frame.filename or "/transformers/" in frame.filename or "/accelerate/" in frame.filename):
            return f"{frame.filename.split('site-packages/')[-1].split('/work/')[-1]}:{frame.lineno} {frame.name}"
    return f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps [skip, skip + n), then one step in sync-debug mode."""

    def __init__(self, skip: int, n: int) -> None:
        self.skip, self.n = skip, n
        self.prof, self.t0, self.report = None, 0.0, {}
        self._warn = None

    def on_step_begin(self, args, state, control, **kwargs):
        cuda = torch.cuda.is_available()
        if state.global_step == self.skip:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            if cuda:
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        if state.global_step == self.skip + self.n and cuda:  # one step listing every synchronising call
            self._warn, self._sites = warnings.catch_warnings(), Counter()
            self._warn.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = lambda *a, **k: self._sites.update([_caller(traceback.extract_stack()[:-1])])
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        cuda = torch.cuda.is_available()
        if state.global_step == self.skip + self.n and self.prof is not None:
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.report.update(self._summary(wall))
            self.prof = None
        elif state.global_step == self.skip + self.n + 1 and self._warn is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._warn.__exit__(None, None, None)
            self._warn = None
            self.report["sync_sites_one_step"] = dict(self._sites.most_common())

    def _summary(self, wall: float) -> dict:
        events = self.prof.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA]
        names = Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CPU)
        n = self.n
        top = sorted(((e.key, e.self_cpu_time_total / n / 1e3, e.count / n) for e in self.prof.key_averages()),
                     key=lambda r: -r[1])[:15]
        return {
            "steps": n, "wall_ms_per_step": 1e3 * wall / n,
            "gpu_busy_ms_per_step": busy_time(kernels) / 1e3 / n,
            "kernels_per_step": len(kernels) / n,
            "cpu_ops_per_step": sum(c for k, c in names.items() if k.startswith("aten::")) / n,
            "launches_per_step": names.get("cudaLaunchKernel", 0) / n + names.get("cuLaunchKernel", 0) / n,
            "graph_replays_per_step": names.get("cudaGraphLaunch", 0) / n,
            "syncs_per_step": {k: names[k] / n for k in SYNC_CALLS if names.get(k)},
            "memcpy_calls_per_step": names.get("cudaMemcpyAsync", 0) / n,
            "top_self_cpu_ms_per_step": [(k, round(ms, 2), round(c, 1)) for k, ms, c in top],
        }


def check_graph_pass(model_dir: str, train_jsonl: str, bsz: int, steps: int = 3) -> dict:
    """The CUDA graphs of a training step (the prefix pass, the latent steps, --graph_pass's pass with gradients)
    against the same step without graphs (static cache, eager), in fp32, on this device: the hidden states and
    every parameter's gradient, for batches of two shapes, each run `steps` times. Two runners of one model, both
    with the eager step (--compile_step off): the reference one on the static cache without graphs, and one on the
    graph path with the pass with gradients graphed (graph_pass). Returns the largest differences (0.0: bit for
    bit)."""
    from lcot.config import SpeedConfig
    from lcot.core.collate import Collator
    from lcot.core.model import latent_hidden_states
    from lcot.fast import Runner
    from lcot.io import to_device
    from lcot.pipeline.data import read_records
    from lcot.pipeline.load import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(model_dir, torch.float32, device=device, speed=SpeedConfig(fast="static",
                                                                                       compile_step="off"))
    model.train()
    eager = model.lcot_runner  # attached: it selected lcot's attention functions, which both runners share
    graphed = Runner(model, fast="graph", compile_step="off", graph_pass=True)
    records = read_records(train_jsonl, need_thought_images=True)
    collate = Collator(processor, model.config, 4, thought_images=True, cache=True)
    batches = [to_device(collate(records[i:i + n]), device) for i, n in ((0, bsz), (bsz, bsz // 2 + 1))]

    def step(batch, runner: Runner) -> tuple[torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        hidden, lat = latent_hidden_states(model, batch, grad="truncated", runner=runner)
        (hidden.pow(2).mean() + lat.pow(2).mean()).backward()
        return hidden.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = [step(b, eager) for b in batches]  # no graph at all: static cache, eager prefix and steps
    dh = dg = 0.0
    for _ in range(steps):
        for b, (h0, g0) in zip(batches, ref):
            h, g = step(b, graphed)  # the prefix graphed from its second pass on, the steps, the pass
            dh = max(dh, (h - h0).abs().max().item())
            dg = max(dg, max((g[n] - g0[n]).abs().max().item() for n in g0))
            assert g.keys() == g0.keys()
    gp = graphed.graphed_pass
    prefixes = sum(len(fl._prefix) for fl in graphed._kept.values())
    return {"device": str(device), "max_abs_diff_hidden": dh, "max_abs_diff_grad": dg, "pass_captures": gp.captures,
            "pass_failed": gp.failed, "prefix_graphs": prefixes, "capture_errors": graphed.capture_errors,
            "shapes": [tuple(b["input_ids"].shape) for b in batches], "replays_each": steps}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--train_jsonl", required=True)
    p.add_argument("--output_dir", default="runs/profile_step")
    p.add_argument("--bsz", type=int, default=64)
    p.add_argument("--skip", type=int, default=20, help="optimizer steps before the profile (warm-up)")
    p.add_argument("--profile_steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="lcot.main's --dataloader_num_workers")
    p.add_argument("--compile", action="store_true", help="lcot.main's --compile")
    p.add_argument("--graph_pass", action="store_true", help="lcot.main's --graph_pass")
    p.add_argument("--compile_step", choices=["auto", "on", "off"], default="auto", help="lcot.main's --compile_step")
    p.add_argument("--check_graph_pass", action="store_true",
                   help="only compare --graph_pass with the eager pass (fp32 values and gradients), no profile")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.check_graph_pass:
        report = check_graph_pass(args.model, args.train_jsonl, args.bsz)
        print(json.dumps(report, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return report
    from lcot.pipeline import train as train_mod
    from lcot.pipeline.trainer import TrainConfig

    prof = StepProfiler(args.skip, args.profile_steps)
    real = train_mod.LatentTrainer

    class Profiled(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(prof)

    train_mod.LatentTrainer = Profiled
    try:
        train_mod.train(TrainConfig(
            stage="stage2", model_name_or_path=args.model, train_jsonl=args.train_jsonl, output_dir=args.output_dir,
            num_latents=4, align_weight=0.0, latent_grad="truncated", per_device_train_batch_size=args.bsz,
            gradient_accumulation_steps=1, learning_rate=1e-3, max_steps=args.skip + args.profile_steps + 2,
            save_steps=100000, logging_steps=1000, preprocess=True, dataloader_num_workers=args.workers,
            compile=args.compile, graph_pass=args.graph_pass, compile_step=args.compile_step,
            overwrite_output_dir=True))
    finally:
        train_mod.LatentTrainer = real
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "bsz": args.bsz,
              **prof.report}
    if args.compile:  # where torch.compile's one-off time went
        report["compile_times"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return report


if __name__ == "__main__":
    main()
