"""CUDA graphs: the latent recurrence on a static KV cache, and training's pass with gradients.

The K latent steps are single-token passes, launch-bound on a GPU (tens of kernels per layer for one
token). `FastLatents` keeps the KV cache in a `transformers.StaticCache` of a fixed number of slots,
so that one call of `lcot.core.latent.latent_step` (the one implementation of a step, not a copy of it)
can be captured as a `torch.cuda.CUDAGraph` and replayed for every later step. The prefix pass (from
column 0, through `text_forward` on the same cache) is captured too, once per prefix length, the second
time that length comes (a length seen once, as in generation over varied prompts, costs no capture):

- the step reads its input, its mask row (over all slots of the cache, slots not written yet masked)
  and its M-RoPE position from three buffers that are refilled in place between replays;
- each static cache layer keeps its write position in a device tensor (`cumulative_length`) that the
  step advances in place, so replays write the next slot without any host-side change; `_seek` sets
  it (in place) to the column a pass starts at.

Mask rows are cut from the batch's own 4D mask (the collator's, built by `lcot.core.mask.build_mask`):
the row of column c is `mask4d[:, :, c, :c+1]`, exactly what the dynamic-cache path uses, padded with
False up to the cache size. No second mask builder.

On a CPU (or with graphs off) the same buffers feed eager calls of `latent_step` on the static
cache: that is what the CPU tests compare with the dynamic-cache `EagerLatents`.

Which path runs (`fast=` of `lcot.core.model.latent_hidden_states` and `lcot.pipeline.generate.generate_batch`;
None means the environment variable LCOT_FAST, else "auto"):
- "auto": the CUDA-graph path on a CUDA model (not sharded by FSDP), the dynamic-cache path otherwise;
- "off": the dynamic-cache path (the reference); "static": static cache, eager steps;
- "graph": static cache with a CUDA graph (eager static steps on a CPU).
The fast path only ever runs without gradients (teacher precompute, generation, and the no-gradient
recurrence of grad="truncated").

`GraphedPass` (--graph_pass) runs training's pass with gradients and without a cache as two graphs, its
forward and its backward (torch.cuda.make_graphed_callables), one pair per batch shape: for small models,
whose training step is bound by launching kernels, not by arithmetic.

A captured graph bakes in addresses and Python control flow. `FastLatents` therefore remembers the
tensors it captured (and keeps them alive) and is replaced when they change (new tensors, `.to()`,
merged or disabled LoRA adapters); graphs are also keyed by batch size, cache size, train/eval mode,
dtype, autocast and inference mode. Call `clear(model)` after anything else that changes the forward.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch
from transformers import StaticCache

from lcot.core import skinny
from lcot.core.adapters import tuner_layers
from lcot.core.latent import (
    _COMPILED_STEP,
    _GRAPHED_PASS,
    EagerLatents,
    checkpointing_on,
    compile_steps,
    latent_loop,
    latent_step,
    text_forward,
)

FastMode = Literal["auto", "off", "static", "graph"]
MODES = ("auto", "off", "static", "graph")
ENV = "LCOT_FAST"
COMPILE_ENV = "LCOT_COMPILE_STEP"  # "1": compile every FastLatents' step; "0": --compile_step auto compiles none
COMPILE_SETTINGS = ("auto", "on", "off")  # --compile_step
COMPILE_NOTE = ("lcot: note: the one-token latent step is compiled (torch.compile) when the first batch reaches it, "
                "and once more at the first new sequence length: about a minute each for a 3B or 7B model (the "
                "progress bar waits meanwhile); --compile_step off skips it.")
BUCKET = 256  # cache sizes are rounded up to a multiple of this, so nearby lengths share one graph
KEEP = 4  # FastLatents (graph + static cache) kept per model, least recently used dropped first
KEEP_PASSES = 8  # graphed passes with gradients (one per input shape) kept per model
KEEP_PREFIXES = 4  # graphed prefix passes (one per prefix length) per FastLatents
PREFIX_CAPTURE_AT = 2  # a prefix length is captured the 2nd time it comes (lengths seen once cost no capture)
WARMUP = 2  # eager steps on a side stream before a capture (cuBLAS workspaces, lazy inits)
CAPTURE_ERRORS: list[str] = []  # failed captures (each falls back to eager steps with a warning)
COMPILE_ERRORS: list[str] = []  # compiled steps that failed (each dropped for the eager step, with a warning)
_COMPILE_FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose compiled step failed: $LCOT_COMPILE_STEP skips them
_AUTO_COMPILE: weakref.WeakSet = weakref.WeakSet()  # models with --compile_step auto: compiled at their first graph


# -- which path ----------------------------------------------------------------------------------------------
def _sharded(model) -> bool:
    """FSDP gathers parameters in hooks around each module: nothing a graph could replay."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def resolve(model, fast: FastMode | bool | None = None) -> Literal["off", "static", "graph"]:
    """The path to run: `fast` (None: $LCOT_FAST, else "auto"), given the model's device."""
    mode = os.environ.get(ENV, "auto") if fast is None else fast
    if mode is True:
        mode = "graph"
    elif mode is False:
        mode = "off"
    if mode not in MODES:
        where = f" (from ${ENV})" if fast is None else ""
        raise ValueError(f"fast must be one of {MODES} or a bool, got {mode!r}{where}")
    cuda = model.device.type == "cuda"
    if mode == "auto":
        return "graph" if cuda and not _sharded(model) else "off"
    if mode == "graph" and not cuda:
        return "static"
    return mode


def step_compile(model, setting: str | bool) -> None:
    """--compile_step: "on"/True compiles the model's one-token step now (lcot.core.latent.compile_steps);
    "off"/False drops a compiled one and compiles none (unless $LCOT_COMPILE_STEP is "1"); "auto" (the default)
    compiles it when its steps first run as CUDA graphs (a FastLatents on a CUDA model; see `resolve`), unless
    $LCOT_COMPILE_STEP is "0"."""
    if setting not in (True, False, *COMPILE_SETTINGS):
        raise ValueError(f"compile_step must be one of {COMPILE_SETTINGS} or a bool, got {setting!r}")
    _AUTO_COMPILE.discard(model)
    if setting in (True, "on"):
        compile_steps(model)
    elif setting == "auto":
        _AUTO_COMPILE.add(model)
    else:
        compile_steps(model, False)


def step_compiles(setting: str | bool, device: torch.device | str) -> bool:
    """Will --compile_step `setting` compile the one-token step of a model on `device` (given $LCOT_FAST and
    $LCOT_COMPILE_STEP)? What the commands say before a run; `_compile_due` decides at the first FastLatents."""
    mode = os.environ.get(ENV, "auto")
    cuda = torch.device(device).type == "cuda"
    static = mode in ("static", "graph") or mode == "auto" and cuda  # the compiled step runs on the static cache
    env = os.environ.get(COMPILE_ENV)
    if setting in (True, "on") or env == "1":
        return static
    return setting == "auto" and cuda and mode in ("auto", "graph") and env != "0"


def _compile_due(model, graphed: bool) -> bool:
    """Should a new FastLatents (its steps CUDA graphs or not) compile the step of `model` now?"""
    if model in _COMPILED_STEP or model in _COMPILE_FAILED:
        return False
    env = os.environ.get(COMPILE_ENV)
    return env == "1" or graphed and model in _AUTO_COMPILE and env != "0"


# -- mask rows -----------------------------------------------------------------------------------------------
def pad_rows(mask4d: torch.Tensor, cols: slice, width: int) -> torch.Tensor:
    """Rows `cols` of the 4D mask as the dynamic-cache pass sees them (keys before cols.stop), padded with
    False to `width` keys: (B, 1, len(cols), width)."""
    if mask4d.dtype != torch.bool:
        raise TypeError(f"the fast path takes the collator's bool mask, got {mask4d.dtype}")
    if cols.stop > width:
        raise ValueError(f"column {cols.stop - 1} is beyond the static cache ({width} slots)")
    rows = mask4d[:, :, cols, :cols.stop]
    return torch.nn.functional.pad(rows, (0, width - cols.stop), value=False)


def step_rows(mask4d: torch.Tensor, start: int, k: int, width: int) -> torch.Tensor:
    """Mask rows of k single-token steps at columns start.., each equal to
    `pad_rows(mask4d, slice(c, c + 1), width)`: (B, 1, k, width)."""
    rows = pad_rows(mask4d, slice(start, start + k), width)
    keys = torch.arange(width, device=rows.device)
    cols = torch.arange(start, start + k, device=rows.device)
    return rows & (keys[None, :] <= cols[:, None])


# -- the fast path ------------------------------------------------------------------------------------------
def _forward_state(model) -> tuple:
    """What a captured graph depends on besides its buffers: tensor addresses, LoRA switches, and whether its
    products are lcot.core.skinny's kernels ($LCOT_SKINNY)."""
    lm = model.model.language_model
    ptrs = tuple(t.data_ptr() for t in (*lm.parameters(), *lm.buffers()))
    lora = tuple((tuple(getattr(m, "merged_adapters", ())), bool(getattr(m, "disable_adapters", False)),
                  str(getattr(m, "active_adapters", "")))
                 for m in tuner_layers(lm))
    return ptrs, lora, skinny.enabled(model)


def _autocast() -> torch.autocast | nullcontext:
    """The caller's CUDA autocast, without its weight-cast cache (cached casts would escape the graph)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return nullcontext()


def capture_graph(step: Callable[[], torch.Tensor], rewind: Callable[[], None], device: torch.device
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture `step()` (one latent step reading the buffers) as a CUDA graph; returns (graph, output buffer).

    `rewind()` sets the cache's write position back to the step's column. Warm-up steps run eagerly on a
    side stream first (each rewound: they write this very step's keys and values, harmlessly); the capture
    itself runs nothing, so after it the position still points at the step and `graph.replay()` does it.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), _autocast():
        for _ in range(WARMUP):
            rewind()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    rewind()
    graph = torch.cuda.CUDAGraph()
    # Other threads (NCCL's watchdog under DDP, data-loading helpers) may make CUDA calls meanwhile: only
    # this thread's calls must be capturable.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), _autocast():
        out = step()
    return graph, out


class FastLatents:
    """A static KV cache of `max_len` slots for `batch_size` rows, and single-token steps on it.

    forward(x, mask4d, position_ids, cols): a multi-token pass through the cache (prefix, suffix);
    run(h, mask4d, position_ids, start, k) -> (inputs, outputs): K latent steps, `latent_loop`'s contract;
    step(x, mask4d, position_ids, col): one single-token step with any input (a decoded token's embedding).
    Every pass writes the cache at its own columns; the columns before it must have been written (by this
    sequence). Steps replay a CUDA graph when `graph` (default: on a CUDA model), else run `latent_step`
    eagerly on the same buffers. No gradients: call it under torch.no_grad().
    """

    def __init__(self, model, max_len: int, batch_size: int, graph: bool | None = None) -> None:
        self._model = weakref.ref(model)
        self.max_len, self.batch_size = max_len, batch_size
        self.device = model.device
        cuda = self.device.type == "cuda"
        self.graph = cuda if graph is None else bool(graph) and cuda
        self.cache = StaticCache(config=model.config.text_config, max_cache_len=max_len)
        if _compile_due(model, self.graph):
            compile_steps(model)
        self.x: torch.Tensor | None = None  # step input (B, 1, H), allocated at the first step
        self.row = torch.zeros(batch_size, 1, 1, max_len, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(3, batch_size, 1, dtype=torch.long, device=self.device)
        self._col: int | None = 0  # the write position the cache's counters hold (None: unknown)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: torch.Tensor | None = None  # the graph's output buffer
        # prefix length -> (graph, input buffers (x, mask rows, positions), output buffer); and how often each came
        self._prefix: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._seen: Counter[int] = Counter()
        self.prefix_graphs = self.graph  # False after a failed capture
        self._tensors: list[torch.Tensor] = []  # what the graph reads, kept alive so addresses are not reused
        self._state: tuple | None = None
        self.captures = 0

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this FastLatents was deleted")
        return model

    def valid(self) -> bool:
        """Do the captured graphs (if any) still compute what `latent_step` and `text_forward` would?"""
        return (self._graph is None and not self._prefix) or _forward_state(self.model) == self._state

    # -- the cache's write position ------------------------------------------------------------------------
    def _seek(self, col: int) -> None:
        if col > self.max_len:
            raise ValueError(f"column {col} is beyond the static cache ({self.max_len} slots)")
        if self._col == col:
            return
        for layer in self.cache.layers:
            if not layer.is_initialized and col:
                raise ValueError("the static cache is empty: run the prefix (a forward from column 0) first")
            layer.cumulative_length.fill_(col)
        self._col = col

    def _check(self, x: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError("FastLatents runs without gradients: call it under torch.no_grad()")
        if x.shape[0] != self.batch_size:
            raise ValueError(f"a batch of {x.shape[0]} rows, this FastLatents holds {self.batch_size}")

    # -- passes ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, cols: slice) -> torch.Tensor:
        """Columns `cols` in one pass, written into the cache; returns their outputs. A pass from column 0 (the
        prefix) replays a CUDA graph once its length has come PREFIX_CAPTURE_AT times; others run eagerly."""
        self._check(x)
        rows = pad_rows(mask4d, cols, self.max_len)
        pos = position_ids[:, :, cols]
        if not cols.start and self.prefix_graphs:
            out = self._graphed_prefix(x, rows, pos)
            if out is not None:
                return out
        self._seek(cols.start or 0)
        self._col = None
        out = text_forward(self.model, x, rows, pos, slice(0, rows.shape[2]), self.cache)
        self._col = cols.stop
        return out

    def _graphed_prefix(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        """The prefix pass from its graph (captured here when due); None: run it eagerly."""
        n = x.shape[1]
        if n not in self._prefix:
            self._seen[n] += 1
            if self._seen[n] < PREFIX_CAPTURE_AT or len(self._prefix) >= KEEP_PREFIXES or not self._capture_prefix(
                    x, rows, pos):
                return None
        graph, buffers, out = self._prefix[n]
        for buf, value in zip(buffers, (x, rows, pos)):
            buf.copy_(value)
        self._seek(0)
        self._col = None
        graph.replay()
        self._col = n
        return out.clone()  # the next replay overwrites the buffer

    def _capture_prefix(self, x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> bool:
        n = x.shape[1]
        buffers = (x.clone(), rows.clone(), pos.clone())

        def step() -> torch.Tensor:
            return text_forward(self.model, *buffers, slice(0, n), self.cache)

        def rewind() -> None:
            self._col = None
            self._seek(0)

        try:
            graph, out = capture_graph(step, rewind, self.device)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back to eager passes, loudly
            self.prefix_graphs = False
            msg = f"{type(err).__name__}: {err}"
            CAPTURE_ERRORS.append(msg)
            warnings.warn(f"lcot.core.graph: CUDA graph capture of the prefix failed ({msg}); running it eagerly",
                          RuntimeWarning, stacklevel=4)
            rewind()
            return False
        self._prefix[n] = (graph, buffers, out)
        self._keep_state()
        return True

    def _keep_state(self) -> None:
        """Remember what the graphs read (and keep it alive, so its addresses are not reused)."""
        lm = self.model.model.language_model
        self._tensors = [*lm.parameters(), *lm.buffers()]
        self._state = _forward_state(self.model)

    def _step(self, x: torch.Tensor, row: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One step at the current write position, from the buffers. Returns the graph's output buffer
        (overwritten by the next step: copy it) or the eager output."""
        if self.x is None:
            self.x = torch.zeros_like(x)
        self.x.copy_(x)
        self.row.copy_(row)
        self.pos.copy_(pos)
        col = self._col
        if self.graph and self._graph is None:
            self._capture(col)
        self._col = None
        if self._graph is not None:
            self._graph.replay()
            out = self._out
        else:
            out = latent_step(self.model, self.x, self.cache, self.row, self.pos, 0)
        self._col = col + 1
        return out

    def _capture(self, col: int) -> None:
        model = self.model
        kernels = skinny.enabled(model)

        def step() -> torch.Tensor:
            with skinny.products(model):  # the layers' kernels for few rows (lcot.core.skinny), in the graph only
                return latent_step(model, self.x, self.cache, self.row, self.pos, 0)

        def rewind() -> None:
            self._col = None
            self._seek(col)

        try:
            self._graph, self._out = capture_graph(step, rewind, self.device)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back to eager steps, loudly
            msg = f"{type(err).__name__}: {err}"
            rewind()
            if kernels:  # try once with cuBLAS's products: the kernels are to blame only if that capture works
                compiled = model in _COMPILED_STEP
                skinny.FAILED.add(model)
                self._capture(col)
                if self._graph is None or compiled != (model in _COMPILED_STEP):
                    skinny.FAILED.discard(model)  # it failed without them too, or the compiled step did (reported)
                    return
                skinny.ERRORS.append(msg)
                warnings.warn(f"lcot.core.graph: the latent step with lcot.core.skinny's kernels failed ({msg}); "
                              "captured it with cuBLAS's products instead", RuntimeWarning, stacklevel=3)
                return
            if model in _COMPILED_STEP:  # compiling (at the warm-up) or capturing the compiled step failed
                compile_steps(model, False)
                _COMPILE_FAILED.add(model)
                COMPILE_ERRORS.append(msg)
                warnings.warn(f"lcot.core.graph: the compiled latent step failed to run or to be captured ({msg}); "
                              "capturing the eager step instead", RuntimeWarning, stacklevel=3)
                return self._capture(col)  # once: the compiled step is gone now
            CAPTURE_ERRORS.append(msg)
            self.graph, self._graph, self._out = False, None, None
            warnings.warn(f"lcot.core.graph: CUDA graph capture failed ({msg}); running eager static-cache steps",
                          RuntimeWarning, stacklevel=3)
            return
        self._keep_state()
        self.captures += 1

    def run(self, h: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, start: int, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """K latent steps from h (B, 1, H), the output of column start-1: (inputs, outputs), each (B, K, H)."""
        self._check(h)
        rows = step_rows(mask4d, start, k, self.max_len)
        self._seek(start)

        def step(x: torch.Tensor, j: int) -> torch.Tensor:  # a copy: the next replay overwrites the buffer
            return self._step(x, rows[:, :, j:j + 1], position_ids[:, :, start + j:start + j + 1]).clone()

        return latent_loop(step, h, k)

    def step(self, x: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, col: int) -> torch.Tensor:
        """One single-token step at column `col` with input x (B, 1, H); returns its output (a new tensor)."""
        self._check(x)
        row = pad_rows(mask4d, slice(col, col + 1), self.max_len)
        self._seek(col)
        return self._step(x, row, position_ids[:, :, col:col + 1]).clone()


# -- one FastLatents per (model, shape, mode), reused across batches -------------------------------------------
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bucket(length: int) -> int:
    """Cache size for sequences of `length` columns."""
    return -(-length // BUCKET) * BUCKET


def fast_latents(model, batch_size: int, length: int, graph: bool | None = None) -> FastLatents:
    """A FastLatents for `batch_size` rows and at least `length` columns, reused (its graph too) while the
    model's forward is unchanged; at most KEEP per model."""
    graph = model.device.type == "cuda" if graph is None else graph
    key = (batch_size, bucket(length), bool(graph), model.training, model.dtype, model.device,
           torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    kept = _REGISTRY.setdefault(model, OrderedDict())
    fl = kept.pop(key, None)
    if fl is None or not fl.valid():
        fl = FastLatents(model, bucket(length), batch_size, graph)
    kept[key] = fl
    while len(kept) > KEEP:
        kept.popitem(last=False)
    return fl


def clear(model=None) -> None:
    """Drop the kept FastLatents (graphs and static caches) of one model, or of all."""
    if model is None:
        _REGISTRY.clear()
    else:
        _REGISTRY.pop(model, None)


def runner(model, batch_size: int, length: int, fast: FastMode | bool | None = None
           ) -> EagerLatents | FastLatents:
    """The cache and steps of a recurrence over `length` columns (see `resolve`); with gradients enabled,
    always the dynamic cache."""
    mode = resolve(model, fast)
    if mode == "off" or torch.is_grad_enabled():
        return EagerLatents(model)
    return fast_latents(model, batch_size, length, graph=mode == "graph")


# -- training's pass with gradients as CUDA graphs (--graph_pass) ---------------------------------------------------
class _Pass(torch.nn.Module):
    """The language model over whole sequences without a cache, with tensors as its only arguments (what
    torch.cuda.make_graphed_callables takes)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


class GraphedPass:
    """Training's pass with gradients and without a KV cache, as a CUDA graph of its forward and one of its
    backward (torch.cuda.make_graphed_callables), one pair per input shape, the KEEP_PASSES newest kept.

    A small model's training step is bound by launching kernels (a pass of the 8M model is ~500 ops forward and
    ~1,000 backward); a replay launches them at once. The replays run the eager pass's kernels. Called with
    (embeds, mask, position_ids); returns the last hidden state, or None where a graph does not apply and the
    caller runs the eager pass: not on CUDA, not training, gradient checkpointing on, a failed capture, or a
    second pass before the first one's backward (bptt:m), whose replay would overwrite the first's buffers.
    `make` stands in for make_graphed_callables in CPU tests.
    """

    def __init__(self, model, make: Callable | None = None, cuda_only: bool = True, keep: int = KEEP_PASSES) -> None:
        self._model = weakref.ref(model)
        self.make = make or torch.cuda.make_graphed_callables
        self.cuda_only, self.keep = cuda_only, keep
        self.graphs: OrderedDict[tuple, Callable] = OrderedDict()
        self.live = False  # a replay's output still waits for its backward
        self.captures = 0
        self.failed: str | None = None
        self._state: tuple | None = None

    def _applies(self, embeds: torch.Tensor) -> bool:
        model = self._model()
        return (model is not None and self.failed is None and not self.live and model.training
                and torch.is_grad_enabled() and (embeds.is_cuda or not self.cuda_only)
                and not checkpointing_on(model))

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        if not self._applies(embeds):
            return None
        model = self._model()
        state = _forward_state(model)
        if state != self._state:  # new weights or adapters: every graph holds stale addresses
            self.graphs.clear()
            self._state = state
        key = (tuple(embeds.shape), embeds.dtype, embeds.requires_grad, tuple(mask.shape), mask.dtype,
               tuple(position_ids.shape), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        fn = self.graphs.pop(key, None) or self._capture(model, embeds, mask, position_ids)
        if fn is None:
            return None
        self.graphs[key] = fn
        while len(self.graphs) > self.keep:
            self.graphs.popitem(last=False)
        out = fn(embeds, mask, position_ids)
        if out.requires_grad:
            self.live = True
            out.register_hook(self._released)
        return out

    def _released(self, grad: torch.Tensor) -> None:
        """The backward reached the output: the graph's buffers are free for the next replay."""
        self.live = False

    def _capture(self, model, embeds: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor):
        sample = (embeds.detach().clone().requires_grad_(embeds.requires_grad), mask.clone(), position_ids.clone())
        try:
            with _autocast():
                # the LM's own token embedding is unused (the pass takes embeddings): allow_unused_input
                fn = self.make(_Pass(model.model.language_model).train(), sample, allow_unused_input=True)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back to the eager pass, loudly
            self.failed = f"{type(err).__name__}: {err}"
            CAPTURE_ERRORS.append(self.failed)
            warnings.warn(f"lcot.core.graph: capturing the pass with gradients failed ({self.failed}); "
                          "running it eagerly", RuntimeWarning, stacklevel=4)
            return None
        self.captures += 1
        return fn


def graph_parallel_pass(model, enable: bool = True) -> None:
    """Run training's pass with gradients (no KV cache: grad="truncated", bptt:m's first pass, the pause feed)
    as CUDA graphs on a CUDA model (GraphedPass); eager elsewhere. Kept outside the module tree."""
    if enable:
        _GRAPHED_PASS[model] = GraphedPass(model)
    else:
        _GRAPHED_PASS.pop(model, None)
