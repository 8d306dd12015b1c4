"""Benchmark of the latent recurrence against its baselines, on a random model of a named shape.

    python benchmarks/bench.py --shape 3b --batch 2 --latent_size 32 --iters 3 --dtype bf16 --out runs/bench/3b.md
    python benchmarks/bench.py --shape 7b --lora --gradient_checkpointing --stages stage2,stage3 ...
    python benchmarks/bench.py --shape tiny --dtype fp32 --iters 2          # CPU: the same rows, wall time only

Nothing is downloaded: the model is randomly initialised from a config of the named shape (tiny: the
lcot.toy.tiny model; small: a 0.5B-class text model with a small vision tower; 3b, 7b: Qwen2.5-VL-3B/7B's
published sizes), with the tiny model's tokenizer (its special-token ids are written into the config).
The batch is built by the real collator from real PNG files (random pixels): per record 2 question
images and, for stage2, 1 thought image (448x448 -> 256 tokens each for 3b/7b), a question of about
100 tokens, K latent slots and an answer of about 32 tokens (949 tokens at K=32 for 3b/7b).

Rows (each: median time over --iters after --warmup, the ratio to its baseline, peak GPU memory):
- sft: the plain SFT step of the same batch (same tokens, causal 2D mask, no latents, forward+backward);
  baseline of every training row. latent_full: the latent step with gradients through the dynamic-cache
  recurrence. latent_truncated: grad="truncated", recurrence on the dynamic cache, prefix computed twice
  (no-gradient pass for the cache, then the full pass with gradients); _static, _graph: the recurrence on the
  static cache, eager or as a CUDA graph; latent_bptt{1,2}: --latent_grad bptt:m (m more parallel passes, the
  gradient through m feedback links); latent_adjoint: --latent_grad adjoint (the full gradient: the truncated
  pass plus K-1 vector-Jacobian products on a pass over the slots, CUDA-graphed). Training rows:
  CE + cosine alignment to a random teacher, backward; no optimizer step unless --optim.
- forward: one no-gradient forward of the batch with its 4D mask (baseline of the teacher rows);
  teacher{,_static,_graph}: teacher precompute (latent mode, no gradients) on each path.
- gen_latent_* / gen_decode_*: generation (lcot.pipeline.generate.generate_batch, question images only): mean time
  per latent step and per decoding step, eager and graphed; each latent row's baseline is the decoding row
  of the same path.
- steps, stage3:steps, teacher_steps: the K graphed latent steps alone (after the prefix pass they need; in
  training mode for the training rows, in eval mode for the teacher's), per step.
- floor: one latent step at the weight-streaming floor (the bytes a step must read, weights and KV cache,
  over the device's measured copy bandwidth), and each training and teacher row's ratio with its K steps at
  that floor and everything else as measured: the lowest ratio a faster step alone could reach.
- numerics: max |graphed - eager| of the teacher latents, first 8 steps in the run's dtype (bf16 drifts after
  ~8 steps on a random deep model), and all K steps in fp32 (--fp32_check converts the model at the end); beside
  it the eager path's own rounding noise: each record alone against the same record in the batch.
On a CPU "graph" runs eager static-cache steps (no CUDA graphs) and no memory is reported.

Every latent row runs through one lcot.fast.Runner (the one `lcot.pipeline.load` gives a model), its path switched
per row (fast = off, static or graph); the switches below build it with the matching keyword, for comparisons:
--compile_step (default off: the eager step; on: the compiled step wherever a static cache runs), --kernels off
(cuBLAS's products in the steps' graphs instead of lcot.fast.skinny's kernels), --step_attention sdpa|stock (the
grouped step attention without FlexAttention, or transformers' sdpa), --no-packed_vision (transformers' vision
tower), --no_cast_adapters (LoRA's adapters cast in every product), --adjoint_graphs off and --adjoint_compile off
(--latent_grad adjoint's products eager, its pass over the slots uncompiled). The table's `runner` line names them.
--paired N also times each row against its baseline in N alternating pairs and notes the median ratio: ratios of
rows timed apart moved by +-20% between processes on one H100 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from lcot.io import to_device

BENCH_SHAPES = ("tiny", "small", "3b", "7b")
IMAGE_SIDE = {"tiny": 112, "small": 224, "3b": 448, "7b": 448}  # 448 -> a 32x32 patch grid -> 256 tokens

LORA_TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"  # as lcot.main's default
NUMERICS_STEPS = 8


# -- model, processor, batch -----------------------------------------------------------------------------------
def make_processor(image_side: int, latent_tokens: bool = True):
    """The tiny tokenizer (Qwen's special tokens, a small BPE) with an image processor keeping image_side^2."""
    from transformers import Qwen2VLImageProcessorPil

    from lcot.core.tokens import add_latent_tokens
    from lcot.pipeline.processor import LatentVLProcessor
    from lcot.toy.tiny import CHAT_TEMPLATE, MIN_PIXELS, build_tokenizer

    tok = build_tokenizer()
    if latent_tokens:
        add_latent_tokens(tok)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": image_side ** 2})
    return LatentVLProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE)


def make_config(shape: str, tok):
    """A Qwen2_5_VLConfig of the named shape whose token ids are the tokenizer's (lcot.toy.tiny.random_config)."""
    from lcot.toy.tiny import random_config

    if shape not in BENCH_SHAPES:
        raise ValueError(f"shape must be one of {BENCH_SHAPES}, got {shape!r}")
    return random_config(shape, tok)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random init directly on `device` in `dtype` (on a GPU: seconds even for 7B)."""
    from lcot.core.model import LatentQwen2_5_VL

    torch.manual_seed(seed)
    with torch.device(device):
        model = LatentQwen2_5_VL._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _text(tok, target: int, start: str = "") -> str:
    """Words of the tiny corpus until the text encodes to at least `target` tokens."""
    from lcot.toy.tiny import CORPUS

    words = [w for w in CORPUS.split() if w.isalpha()]
    text, i = start, 0
    while len(tok(text, add_special_tokens=False)["input_ids"]) < target:
        text += ("" if not text or text.endswith("\n") else " ") + words[i % len(words)]
        i += 1
    return text


def make_records(folder: Path, n: int, image_side: int, tok, question_images: int = 2, thought_images: int = 1,
                 question_tokens: int = 100, answer_tokens: int = 32, seed: int = 0) -> list:
    """n records of identical token length, with PNGs of random pixels written to `folder`."""
    from PIL import Image

    from lcot.core.record import Record

    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    question = _text(tok, question_tokens)
    answer = _text(tok, max(answer_tokens - 1, 1), "\n")[1:]  # "\n" + answer + <|im_end|>
    records = []
    for i in range(n):
        paths = []
        for j in range(question_images + thought_images):
            px = torch.randint(0, 256, (image_side, image_side, 3), dtype=torch.uint8, generator=gen)
            path = folder / f"r{i}_{j}.png"
            Image.fromarray(px.numpy()).save(path)
            paths.append(path)
        records.append(Record(idx=i, question=question, answer=f"#### {answer}", final_answer=answer,
                              question_images=tuple(paths[:question_images]),
                              thought_images=tuple(paths[question_images:]), where=f"bench:{i}", digest=""))
    return records


# -- the floor of a latent step ---------------------------------------------------------------------------------
def step_bytes(model, batch: int, slots: int) -> int:
    """Bytes one single-token step must read: the language model's weights (not its embedding table: a step is
    fed a hidden state) and the keys and values of `slots` cache slots for `batch` rows."""
    lm = model.model.language_model
    table = {id(p) for p in lm.embed_tokens.parameters()}
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in lm.parameters()}.values()
                  if id(p) not in table)
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * head_dim * slots
    return weights + kv * torch.finfo(model.dtype).bits // 8


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, iters: int = 5, reps: int = 4) -> float:
    """Bytes per second moved (read + write) by device-to-device copies of `nbytes`: the best of `iters`
    timings of `reps` copies each (one copy alone is short enough that the host's timing would read it low)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return nbytes / best


def step_floor(model, batch: dict, bandwidth: float) -> tuple[float, int]:
    """(seconds, bytes) of one latent step of `batch` (a collator batch) at the floor: the bytes it must read, over
    the copy bandwidth; its KV cache has lcot.fast.graph's bucketed number of slots."""
    from lcot.fast.graph import bucket

    nbytes = step_bytes(model, batch["input_ids"].shape[0], bucket(batch["input_ids"].shape[1]))
    return nbytes / bandwidth, nbytes


def floor_bound(ratio: float, row_s: float, steps_s: float, k: int, floor_s: float) -> float:
    """A row's ratio to its baseline (row_s its time, steps_s the time of its K latent steps) had each step taken
    floor_s, all else as measured. The share the steps would save is taken from the row's own time, so `ratio`
    may be the paired ratio, measured apart from row_s."""
    return ratio * (1 - (steps_s - k * max(floor_s, 0.0)) / row_s)


def floor_bounds(rows: list[dict], cases: list[tuple[str, str, int, float]]) -> list[tuple[str, float, float, float]]:
    """(row, ratio, floor bound, seconds a step measured) for each case (row, its K-steps row, K, floor) whose rows
    were measured; the ratio is the paired one where there is one."""
    by = {r["name"]: r for r in rows}
    out = []
    for name, steps, k, floor_s in cases:
        r, st = by.get(name), by.get(steps)
        if r and st and r.get("ratio") and r.get("time_s") and st.get("time_s"):
            ratio = r.get("paired") or r["ratio"]
            out.append((name, ratio, floor_bound(ratio, r["time_s"], st["time_s"], k, floor_s), st["time_s"] / k))
    return out


# -- timing ------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(model, device: torch.device) -> None:
    """Between rows: no kept graphs or caches (the model's runner's), no gradients, allocator emptied, peak reset."""
    runner = getattr(model, "lcot_runner", None)
    if runner is not None:
        runner.clear()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # (a full gc.collect takes ~0.5 s: only where memory is measured)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(fn: Callable[[], dict | None], iters: int, warmup: int, device: torch.device,
            metric: Callable[[dict | None, float], float] | None = None) -> tuple[float, float | None, list[float]]:
    """Median over `iters` calls after `warmup` (wall time, synchronised; or metric(result, seconds)) and the
    peak memory of the timed calls (GiB; None on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    values = []
    for _ in range(max(iters, 1)):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        dt = time.perf_counter() - t0
        values.append(metric(out, dt) if metric else dt)
    return statistics.median(values), _peak(device), values


def source_commit() -> str:
    """The commit the benchmark ran from: $LCOT_COMMIT when given (a GPU machine that got a copy of the tree may
    have no .git, or a stale one), else git's; "unknown" otherwise. A table names its device, commit and date.
    (Metadata only: no LCOT_* variable changes what runs.)"""
    if os.environ.get("LCOT_COMMIT"):
        return os.environ["LCOT_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
            return done.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def paired_ratio(fn: Callable, base: Callable, pairs: int, device: torch.device) -> tuple[float, list[float]]:
    """Median of time(fn) / time(base) over `pairs` calls taken alternately (base, fn, base, fn, ...): both
    sides see the same drift of clocks and host load, which separate rows (and processes) do not."""
    def timed(f: Callable) -> float:
        _sync(device)
        t0 = time.perf_counter()
        f()
        _sync(device)
        return time.perf_counter() - t0

    ratios = []
    for _ in range(max(pairs, 1)):
        b = timed(base)
        ratios.append(timed(fn) / b)
    return statistics.median(ratios), ratios


KERNELS = {"on": True, "off": False, "interpret": "interpret"}


def runner_options(args) -> dict:
    """The lcot.fast.Runner keywords (besides `fast`, which each row sets) that the command line asks for."""
    return {"compile_step": args.compile_step, "kernels": KERNELS[args.kernels], "step_attention": args.step_attention,
            "vision": args.packed_vision, "cast_adapters": args.cast_adapters,
            "adjoint_graphs": args.adjoint_graphs == "on", "adjoint_compile": args.adjoint_compile == "on"}


# -- the bench ---------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        self.rows: list[dict] = []
        self.env: dict = {}
        self.options = runner_options(args)  # the runner's keywords (besides fast)
        self.runner = None  # lcot.fast.Runner, built in setup
        self._seen: dict[str, int] = {}  # failure list -> entries already noted in a row
        self._fns: dict[str, Callable] = {}  # row name -> what it timed (the baselines of --paired)
        self.tmp = Path(tempfile.mkdtemp(prefix="lcot-bench-"))

    # -- output ----------------------------------------------------------------------------------------------
    def add(self, name: str, what: str, *, time_s: float | None = None, baseline: str | None = None,
            peak: float | None = None, value: float | None = None, note: str = "", unit: str = "s",
            paired: float | None = None) -> dict:
        for label, errors in self.failures():  # a row that silently ran another path says so
            if len(errors) > self._seen.get(label, 0):
                note = (note + "; " if note else "") + f"{label}: {errors[-1][:160]}"
                self._seen[label] = len(errors)
        ratio = None
        if time_s is not None and baseline:
            base = next((r for r in self.rows if r["name"] == baseline), None)
            if base is not None and base.get("time_s"):
                ratio = time_s / base["time_s"]
        base_peak = next((r.get("peak_gib") for r in self.rows if r["name"] == baseline), None)
        row = {"name": name, "what": what, "time_s": time_s, "unit": unit, "baseline": baseline, "ratio": ratio,
               "peak_gib": peak, "peak_ratio": peak / base_peak if peak and base_peak else None, "value": value,
               "paired": paired, "note": note}
        self.rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
        self.write()
        return row

    def failures(self) -> list[tuple[str, list[str]]]:
        """The runner's failure lists, each with the note a row gets when it grew (each failure turns one thing off
        for the runner, with a warning)."""
        r = self.runner
        if r is None:
            return []
        return [("GRAPH CAPTURE FAILED, eager steps", r.capture_errors),
                ("COMPILED STEP FAILED, the eager step graphed", r.compile_errors),
                ("SKINNY KERNELS FAILED, cuBLAS's products", r.kernel_errors),
                ("ADJOINT FELL BACK", r.adjoint_state.errors)]

    def path(self, fast: str, runner=None):
        """The runner (default: the bench's) on path `fast` ("off": the dynamic cache; "static"; "graph"). The rows
        share one runner, as a trained model has one: its compiled step, kernel copy and adjoint state serve every
        row, and each path keeps its own static caches and graphs."""
        runner = self.runner if runner is None else runner
        runner.fast = fast
        return runner

    def write(self) -> None:
        if self.args.out:
            write_results(Path(self.args.out), self.env, self.rows)

    def wanted(self, name: str) -> bool:
        pats = self.args.rows
        return not pats or any(fnmatch.fnmatchcase(name, p) for p in pats)

    def row(self, name: str, what: str, fn: Callable, baseline: str | None = None, metric=None, unit: str = "s",
            note: str = "") -> None:
        """Measure fn into a row; an error (out of memory, ...) becomes the row's note and the bench goes on."""
        if not self.wanted(name):
            return
        _fresh(self.model, self.device)
        paired = None
        try:
            t, peak, _ = measure(fn, self.args.iters, self.args.warmup, self.device, metric)
            if self.args.paired and baseline in self._fns and metric is None:
                paired, ratios = paired_ratio(fn, self._fns[baseline], self.args.paired, self.device)
                note = (note + "; " if note else "") + (f"paired ratio {paired:.2f}x (median of {len(ratios)} "
                                                        f"alternating pairs, {min(ratios):.2f}-{max(ratios):.2f})")
        except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others
            traceback.print_exc(file=sys.stderr)
            self.add(name, what, baseline=baseline, note=f"error: {type(err).__name__}: {str(err)[:200]}")
        else:
            self._fns[name] = fn
            self.add(name, what, time_s=t, baseline=baseline, peak=peak, note=note, unit=unit, paired=paired)

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from lcot import __version__
        from lcot.core.collate import Collator

        a = self.args
        side = a.image_side or IMAGE_SIDE[a.shape]
        self.processor = make_processor(side)
        config = make_config(a.shape, self.processor.tokenizer)
        t0 = time.perf_counter()
        self.model = build_model(config, self.device, self.dtype, a.seed)
        init_s = time.perf_counter() - t0
        total = n_params(self.model)
        if a.lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                             target_modules=rf".*language_model.*\.({LORA_TARGETS})")
            self.model = get_peft_model(self.model, cfg).get_base_model()  # LoRA layers injected in place
        from lcot.fast import Runner

        # as lcot.pipeline.load does: the runner selects lcot's vision and step attention (--no-packed_vision,
        # --step_attention stock: transformers')
        self.runner = Runner(self.model, fast="graph", **self.options).attach()
        if a.freeze_vision:
            self.model.model.visual.requires_grad_(False)
        if a.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        records = make_records(self.tmp / "images", a.batch, side, self.processor.tokenizer, a.question_images,
                               1, a.question_tokens, a.answer_tokens, a.seed)
        self.records = records
        self.batches = {}
        for stage in dict.fromkeys([*a.stages, "stage2"]):  # stage2's batch also serves the teacher rows
            coll = Collator(self.processor, config, a.num_latents, thought_images=stage == "stage2")
            self.batches[stage] = to_device(coll(records), self.device)
        b = self.batches["stage2"]
        hidden = config.text_config.hidden_size
        self.teacher = torch.randn(a.batch, a.num_latents, hidden, generator=torch.Generator().manual_seed(1)).to(
            self.device, self.dtype)
        dev = self.device
        import transformers
        try:
            import peft
            peft_version = peft.__version__
        except ImportError:
            peft_version = None
        self.env = {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}"
                      f", {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft_version, "lcot": __version__, "python": platform.python_version(),
            "shape": a.shape, "params": total, "trainable": sum(p.numel() for p in self.model.parameters()
                                                                  if p.requires_grad),
            "dtype": a.dtype, "batch": a.batch, "num_latents": a.num_latents, "stages": a.stages,
            "seq_len": {s: int(x["input_ids"].shape[1]) for s, x in self.batches.items()},
            "latent_start": int(b["latent_start"]), "lora": a.lora, "gradient_checkpointing": a.gradient_checkpointing,
            "freeze_vision": a.freeze_vision, "packed_vision": a.packed_vision, "optim": a.optim,
            "runner": self.options,
            "autocast": a.autocast, "iters": a.iters, "warmup": a.warmup,
            "init_s": round(init_s, 2), "command": "python benchmarks/bench.py " + " ".join(a.argv),
            "commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "inductor_env": {k: v for k, v in sorted(os.environ.items())  # inductor's options
                             if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR"},
        }
        print(json.dumps(self.env), file=sys.stderr, flush=True)
        self.write()

    # -- the steps measured ----------------------------------------------------------------------------------
    def _optim_step(self) -> None:
        if self.args.optim:
            if getattr(self, "opt", None) is None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.opt = torch.optim.AdamW(params, lr=1e-6, fused=self.device.type == "cuda")
            self.opt.step()
        self.model.zero_grad(set_to_none=True)

    def amp(self):
        """--autocast: the bf16 autocast the trainer runs a --bf16 model under (accelerate's mixed precision)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.autocast else nullcontext()

    def sft_step(self, b: dict) -> None:
        from lcot.core.loss import ce_loss

        m = self.model
        with self.amp():
            out = m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                          image_grid_thw=b["image_grid_thw"], use_cache=False)
            loss = ce_loss(m.lm_head, out.last_hidden_state, b["labels"])
        loss.backward()
        self._optim_step()

    def latent_train_step(self, b: dict, grad: str, fast: str) -> None:
        from lcot.core.loss import align_loss

        with self.amp():
            out = self.model(input_ids=b["input_ids"], attention_mask_4d=b["attention_mask_4d"],
                             position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                             image_grid_thw=b["image_grid_thw"], labels=b["labels"], latent_mode=True,
                             latent_start=b["latent_start"], num_latents=b["num_latents"], grad=grad,
                             runner=self.path(fast), return_logits=False)
            loss = out.loss + align_loss(out.latent_hidden, self.teacher[:, :b["num_latents"]])[0]
        loss.backward()
        self._optim_step()

    def embed(self, b: dict) -> torch.Tensor:
        """The input embeddings of a collator batch, the vision tower run as the runner runs it."""
        from lcot.core.latent import embed_inputs

        return embed_inputs(self.model, b["input_ids"], b["pixel_values"], b["image_grid_thw"],
                            vision=self.runner.vision(self.model))

    @torch.no_grad()
    def forward_nograd(self, b: dict) -> None:
        from lcot.core.latent import text_forward

        embeds = self.embed(b)
        text_forward(self.model, embeds, b["attention_mask_4d"], b["position_ids"], slice(0, embeds.shape[1]))

    @torch.no_grad()
    def teacher_latents(self, b: dict, fast: str) -> torch.Tensor:
        from lcot.core.model import latent_hidden_states

        return latent_hidden_states(self.model, b, answer=False, runner=self.path(fast))[1]  # as lcot.pipeline.teacher

    @torch.no_grad()
    def chain_steps(self, b: dict, fast: str = "graph", around=None, runner=None) -> float:
        """Seconds of the K graphed latent steps alone, after the prefix pass they read (in the model's mode; in
        training mode under --autocast, with the chain's adapter casts, as lcot.core.model runs it). runner: another
        lcot.fast.Runner of the model to run them with (default: the bench's)."""
        s, k, mask, pos = b["latent_start"], b["num_latents"], b["attention_mask_4d"], b["position_ids"]
        amp = self.amp() if self.model.training else nullcontext()
        runner = self.path(fast, runner)
        with amp, runner.chain(self.model):
            embeds = self.embed(b)
            steps = runner.recurrence(self.model, embeds.shape[0], embeds.shape[1])
            h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
            _sync(self.device)
            t0 = time.perf_counter()
            with around or nullcontext():  # (a profiler, say: the steps alone)
                steps.run(h[:, -1:], mask, pos, s, k)
                _sync(self.device)
        return time.perf_counter() - t0

    def generate(self, fast: str) -> dict:
        from lcot.pipeline.generate import generate_batch

        timings: dict = {}
        generate_batch(self.model, self.processor, self.records, self.args.num_latents,
                       max_new_tokens=self.args.decode_tokens, runner=self.path(fast), timings=timings)
        return timings

    # -- the rows ----------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        a, m = self.args, self.model
        cpu = self.device.type != "cuda"
        graph_note = "CPU: eager static-cache steps (no CUDA graphs)" if cpu else ""
        for stage in a.stages:
            self.training_rows(stage, "" if stage == a.stages[0] else f"{stage}:", graph_note)
        b = self.batches["stage2"]
        m.eval()
        self.row("forward", "one forward without gradients, 4D mask (teacher baseline)", lambda: self.forward_nograd(b))
        for fast, suffix in (("off", ""), ("static", "_static"), ("graph", "_graph")):
            self.row(f"teacher{suffix}", f"teacher precompute (latent mode, no gradients), fast={fast}",
                     lambda fast=fast: self.teacher_latents(b, fast), "forward",
                     note=graph_note if fast == "graph" else "")
        self.row("teacher_steps", "the K latent steps alone, as the teacher runs them (no gradients, eval mode)",
                 lambda: self.chain_steps(b), metric=lambda out, _: out, note=graph_note)
        self.floor_row()
        for fast, suffix in (("off", "eager"), ("graph", "graph")):
            self.generation_rows(fast, suffix, graph_note if fast == "graph" else "")
        self.numerics(b, a.dtype)
        if a.fp32_check and self.dtype != torch.float32 and self.wanted("numerics_fp32"):
            _fresh(m, self.device)
            m.float()
            self.numerics(b, "fp32")
        m.train()
        return self.rows

    def training_rows(self, stage: str, p: str, graph_note: str) -> None:
        b = self.batches[stage]
        self.model.train()
        what = f"{stage} batch, L={b['input_ids'].shape[1]}"
        self.row(f"{p}sft", f"plain SFT step, causal 2D mask, no latents ({what})", lambda: self.sft_step(b))
        full = "latent step, full gradient, dynamic-cache recurrence"
        if self.args.gradient_checkpointing and self.wanted(f"{p}latent_full"):
            self.add(f"{p}latent_full", full, baseline=f"{p}sft",
                     note="n/a: needs the KV cache that gradient checkpointing drops")
        elif not self.args.gradient_checkpointing:
            self.row(f"{p}latent_full", full, lambda: self.latent_train_step(b, "full", "off"), f"{p}sft")
        for fast, suffix, label in (
                ("off", "", "dynamic-cache recurrence, eager"),
                ("static", "_static", "static-cache recurrence, eager"),
                ("graph", "_graph", "static cache + CUDA graph (the default)")):
            self.row(f"{p}latent_truncated{suffix}", f"latent step, truncated gradient, {label}",
                     lambda fast=fast: self.latent_train_step(b, "truncated", fast), f"{p}sft",
                     note=graph_note if fast == "graph" else "")
        self.row(f"{p}latent_adjoint", "latent step, full gradient by the adjoint solve (--latent_grad adjoint), "
                 "static cache + CUDA graph", lambda: self.latent_train_step(b, "adjoint", "graph"), f"{p}sft",
                 note=graph_note)
        for m in (1, 2):  # truncated backprop through m feedback links: m more parallel passes
            self.row(f"{p}latent_bptt{m}", f"latent step, --latent_grad bptt:{m}, static cache + CUDA graph",
                     lambda m=m: self.latent_train_step(b, f"bptt:{m}", "graph"), f"{p}sft", note=graph_note)
        self.row(f"{p}steps", "the K latent steps alone, as training's chain runs them (no gradients, training mode)",
                 lambda: self.chain_steps(b), metric=lambda out, _: out, note=graph_note)

    def floor_row(self) -> None:
        """One step at the weight-streaming floor, and what each latent row would cost with its steps there."""
        if not self.wanted("floor"):
            return
        _fresh(self.model, self.device)
        bw = copy_bandwidth(self.device, 2**28 if self.device.type != "cuda" else 2**31)
        floor, nbytes = step_floor(self.model, self.batches["stage2"], bw)
        cases = [("teacher_graph", "teacher_steps", self.batches["stage2"])]
        for stage in self.args.stages:
            p = "" if stage == self.args.stages[0] else f"{stage}:"
            cases += [(f"{p}{row}", f"{p}steps", self.batches[stage]) for row in ("latent_truncated_graph",
                                                                                 "latent_adjoint")]
        notes = [f"{nbytes / 1e9:.3g} GB read per step (weights, KV cache) at {bw / 1e9:.0f} GB/s (device copies)"]
        cases = [(name, steps, b["num_latents"], step_floor(self.model, b, bw)[0]) for name, steps, b in cases]
        for name, ratio, bound, step_s in floor_bounds(self.rows, cases):
            notes.append(f"{name} {ratio:.2f}x -> {bound:.2f}x ({step_s * 1e3:.2f} ms a step measured)")
        self.add("floor", "one latent step at the weight-streaming floor; each latent row's ratio with its K steps "
                 "there, all else as measured", time_s=floor, unit="s/step", value=bw, note="; ".join(notes))

    def generation_rows(self, fast: str, suffix: str, note: str) -> None:
        """Per-step means of decoding and latent steps, from the same generate_batch calls."""
        decode, latent = f"gen_decode_{suffix}", f"gen_latent_{suffix}"
        if not (self.wanted(decode) or self.wanted(latent)):
            return
        _fresh(self.model, self.device)
        try:
            for _ in range(self.args.warmup):
                self.generate(fast)
            _sync(self.device)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            runs = [self.generate(fast) for _ in range(max(self.args.iters, 1))]
        except Exception as err:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            for name in (decode, latent):
                self.add(name, f"generation, fast={fast}", note=f"error: {type(err).__name__}: {str(err)[:200]}")
            return
        peak = _peak(self.device)
        per_decode = statistics.median(t["decode_s"] / max(t["decode_steps"], 1) for t in runs)
        per_latent = statistics.median(t["latents_s"] / max(t["latents_steps"], 1) for t in runs)
        steps = runs[0]["decode_steps"]
        self.add(decode, f"generation: one decoding step (mean of {steps}), fast={fast}", time_s=per_decode,
                 peak=peak, unit="s/step", note=note)
        self.add(latent, f"generation: one latent step (mean of {self.args.num_latents}), fast={fast}",
                 time_s=per_latent,
                 baseline=decode, peak=peak, unit="s/step", note=note)

    @torch.no_grad()
    def _recurrence(self, b: dict, embeds: torch.Tensor, fast: str) -> torch.Tensor:
        """The teacher's latents from given input embeddings (prefix pass, K steps) on one path."""
        s, k = b["latent_start"], b["num_latents"]
        steps = self.path(fast).recurrence(self.model, embeds.shape[0], embeds.shape[1])
        h = steps.forward(embeds[:, :s], b["attention_mask_4d"], b["position_ids"], slice(0, s))
        return steps.run(h[:, -1:], b["attention_mask_4d"], b["position_ids"], s, k)[1].float()

    @torch.no_grad()
    def _alone(self, b: dict) -> torch.Tensor:
        """The eager teacher latents of each record of the stage2 batch, computed in a batch of one: the same
        values up to rounding (other matrix shapes), so their distance is the eager path's own rounding noise."""
        from lcot.core.collate import Collator

        coll = Collator(self.processor, self.model.config, b["num_latents"], thought_images=True)
        out = []
        for rec in self.records:
            one = to_device(coll([rec]), self.device)
            embeds = self.embed(one)
            out.append(self._recurrence(one, embeds, "off"))
        return torch.cat(out)

    def numerics(self, b: dict, dtype_name: str) -> None:
        """Teacher latents, same input embeddings, three paths: graphed vs the dynamic cache (first 8 steps,
        all K), and graphed (steps; then steps and prefix) vs static eager (same kernels: the capture/replay
        alone; expect 0)."""
        name = f"numerics_{dtype_name}"
        if not self.wanted(name):
            return
        _fresh(self.model, self.device)
        try:
            with torch.no_grad():
                embeds = self.embed(b)
            ref = self._recurrence(b, embeds, "off")
            static = self._recurrence(b, embeds, "static")
            got = self._recurrence(b, embeds, "graph")
            again = self._recurrence(b, embeds, "graph")  # the prefix's length came twice: its graph replays
        except Exception as err:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            self.add(name, "graphed vs eager latents", note=f"error: {type(err).__name__}: {str(err)[:200]}")
            return
        n = min(NUMERICS_STEPS, got.shape[1])
        first = (got[:, :n] - ref[:, :n]).abs().max().item()
        every = (got - ref).abs().max().item()
        replay = max((got - static).abs().max().item(), (again - static).abs().max().item())
        alone = self._alone(b)
        floor = f"{(alone[:, :n] - ref[:, :n]).abs().max().item():.3g} / {(alone - ref).abs().max().item():.3g}"
        self.add(name, f"max |graphed - eager| latents, first {n} steps ({dtype_name})", value=first, unit="abs",
                 note=f"all {got.shape[1]} steps: {every:.3g}; graphed vs static eager (capture/replay only): "
                      f"{replay:.3g}; the eager path's own rounding (each record alone vs in the batch, first {n} / "
                      f"all steps): {floor}; max |latent| {ref.abs().max().item():.3g}")
        _fresh(self.model, self.device)


# -- table -------------------------------------------------------------------------------------------------------
def _fmt_time(row: dict) -> str:
    t = row.get("time_s")
    if t is None:
        return "-" if row.get("value") is None else f"{row['value']:.3g}"
    return f"{t * 1e3:.2f} ms" if row.get("unit") == "s/step" or t < 0.1 else f"{t:.3f} s"


def _cells(row: dict) -> list[str]:
    ratio = f"{row['ratio']:.2f}x {row['baseline']}" if row.get("ratio") is not None else "-"
    peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
    if row.get("peak_ratio") is not None:
        peak += f" ({row['peak_ratio']:.2f}x)"
    return [row["name"], _fmt_time(row), ratio, peak, row["what"] + (f" [{row['note']}]" if row.get("note") else "")]


HEADER = ["row", "time (or value)", "ratio to baseline", "peak GiB (ratio)", "what"]


def format_row(row: dict) -> str:
    return " | ".join(_cells(row))


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, env: dict, rows: list[dict]) -> None:
    """OUT.json: environment and rows; unless OUT ends in .json, OUT also gets the markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"env": env, "rows": rows}, indent=1, default=str) + "\n"
    if out.suffix == ".json":
        out.write_text(data)
        return
    out.write_text(markdown(env, rows))
    out.with_suffix(".json").write_text(data)


# -- CLI -----------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=BENCH_SHAPES, default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent_size", dest="num_latents", type=int, default=32, help="K latent steps")
    p.add_argument("--iters", type=int, default=3, help="timed calls per row (the median is reported)")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="also time each row against its baseline in N alternating pairs and note the median ratio "
                        "(steadier than the ratio of two rows timed apart)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row first (graph capture happens here)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--stages", default="stage2", help="comma-separated: stage2 (with a thought image), stage3")
    p.add_argument("--lora", action="store_true", help="LoRA on the language model (peft, r=16), base frozen")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--freeze_vision", action="store_true")
    p.add_argument("--packed_vision", action=argparse.BooleanOptionalAction, default=True,
                   help="the vision tower's attention as lcot trains it (lcot.fast.vision's packed attention, no "
                        "per-window loop) in every row, the plain SFT step included; --no-packed_vision: "
                        "transformers' sdpa path (a loop over windows) in every row (the runner's vision=False), as "
                        "the tables measured before 2026-11-26, whose shared vision cost flattered every ratio")
    # the runner's switches (lcot.fast.Runner's keywords; the defaults are lcot's but for --compile_step)
    p.add_argument("--compile_step", choices=["auto", "on", "off"], default="off",
                   help="torch.compile the one-token step: off (the eager step, in every row: bench.py's default, "
                        "which lcot's commands' auto differs from), on (the compiled step wherever the steps run on "
                        "a static cache: the _static and _graph rows, generation; the adjoint's pass over the slots "
                        "too), auto (where the steps run as CUDA graphs, as lcot's commands)")
    p.add_argument("--kernels", choices=list(KERNELS), default="on",
                   help="lcot.fast.skinny's kernels for the products in the steps' CUDA graphs; off: cuBLAS's; "
                        "interpret: also on a CPU under Triton's interpreter (TRITON_INTERPRET=1)")
    p.add_argument("--step_attention", choices=["flex", "sdpa", "stock"], default="flex",
                   help="the language model's attention: lcot.fast.attention's grouped step attention in "
                        "FlexAttention (flex) or in sdpa's kernel (sdpa), or transformers' sdpa (stock)")
    p.add_argument("--no_cast_adapters", dest="cast_adapters", action="store_false",
                   help="LoRA's adapter weights cast in every product under autocast, instead of once a chain "
                        "(lcot.fast.adapters)")
    p.add_argument("--adjoint_graphs", choices=["on", "off"], default="on",
                   help="--latent_grad adjoint's vector-Jacobian products as CUDA graphs (off: eager)")
    p.add_argument("--adjoint_compile", choices=["on", "off"], default="on",
                   help="--latent_grad adjoint's pass over the slots compiled where the chain ran the compiled "
                        "step (off: uncompiled)")
    p.add_argument("--optim", action="store_true", help="add an AdamW step to every training row")
    p.add_argument("--autocast", action="store_true", help="the training rows (and the K steps in training mode) "
                   "under bf16 autocast, as the trainer runs a --bf16 model; with --lora, peft's fp32 adapters are "
                   "then cast to bf16 in every product, as in training")
    p.add_argument("--question_images", type=int, default=2)
    p.add_argument("--question_tokens", type=int, default=100)
    p.add_argument("--answer_tokens", type=int, default=32)
    p.add_argument("--decode_tokens", type=int, default=32, help="decoding steps in the generation rows")
    p.add_argument("--image_side", type=int, default=None, help="default: 448 for 3b/7b, 224 small, 112 tiny")
    p.add_argument("--fp32_check", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, convert the model to fp32 and compare graphed and eager latents (all K)")
    p.add_argument("--rows", default="", help="only these rows (comma-separated names or fnmatch patterns, "
                   "e.g. 'sft,latent_truncated*'); default all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table here (markdown; and the same name .json), or JSON if *.json")
    p.add_argument("--save_model", metavar="DIR", help="instead of benchmarking: write a random model of --shape "
                   "with its processor to DIR (a checkpoint for lcot.main / lcot.precompute_teacher_latents)")
    return p


def save_model(shape: str, out: str | Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Path:
    """A random checkpoint of `shape` (tokenizer without latent tokens: lcot.pipeline.load adds them, as for Qwen)."""
    out = Path(out)
    processor = make_processor(IMAGE_SIDE[shape], latent_tokens=False)
    model = build_model(make_config(shape, processor.tokenizer), device, dtype, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"lcot.bench: random {shape} model ({n_params(model) / 1e6:.1f}M parameters) in {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not args.stages or any(s not in ("stage2", "stage3") for s in args.stages):
        raise SystemExit(f"lcot.bench: --stages takes stage2 and/or stage3, got {args.stages}")
    if args.autocast and args.dtype != "bf16":
        raise SystemExit("lcot.bench: --autocast mirrors the trainer's --bf16 (a bf16 model under bf16 autocast): "
                         "pass --dtype bf16")
    if args.save_model:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
        save_model(args.shape, args.save_model, dtype, torch.device(args.device), args.seed)
        return []
    bench = Bench(args)
    bench.setup()
    rows = bench.run()
    print(markdown(bench.env, rows))
    bad = [r["name"] for r in rows if r.get("time_s") is not None and not math.isfinite(r["time_s"])]
    if bad:
        print(f"lcot.bench: non-finite times in {bad}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
