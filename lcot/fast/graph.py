"""CUDA graphs: the latent recurrence on a static KV cache, and training's pass with gradients.

The K latent steps are single-token passes, launch-bound on a GPU (tens of kernels per layer for one token).
`FastLatents` keeps the KV cache in a `transformers.StaticCache` of a fixed number of slots, so that one call of
`lcot.core.latent.latent_step` (the one implementation of a step, not a copy of it) can be captured as a
`torch.cuda.CUDAGraph` and replayed for every later step. The prefix pass (from column 0, through `text_forward` on
the same cache) is captured too, once per prefix length, the second time that length comes (a length seen once, as
in generation over varied prompts, costs no capture):

- the step reads its input, its mask row (over all slots of the cache, slots not written yet masked) and its M-RoPE
  position from three buffers that are refilled in place between replays;
- each static cache layer keeps its write position in a device tensor (`cumulative_length`) that the step advances
  in place, so replays write the next slot without any host-side change; `_seek` sets it (in place) to the column a
  pass starts at.

Mask rows are cut from the batch's own 4D mask (the collator's, built by `lcot.core.mask.build_mask`): the row of
column c is `mask4d[:, :, c, :c+1]`, exactly what the dynamic-cache path uses, padded with False up to the cache
size. No second mask builder. On a CPU (or with graphs off) the same buffers feed eager calls of `latent_step` on
the static cache: that is what the CPU tests compare with the dynamic-cache `EagerLatents`. The fast path only ever
runs without gradients (teacher precompute, generation, and the no-gradient recurrence of grad="truncated").

`GraphedPass` (--graph_pass) runs training's pass with gradients and without a cache as two graphs, its forward and
its backward (torch.cuda.make_graphed_callables), one pair per batch shape: for small models, whose training step is
bound by launching kernels, not by arithmetic.

Both belong to a `lcot.fast.runner.Runner`, which owns them, decides which language model each captured pass runs
(compiled or not, with lcot.fast.skinny's kernels or not) and records failures. A captured graph bakes in addresses
and Python control flow: `FastLatents` remembers the tensors it captured (and keeps them alive) and is replaced when
they change (new tensors, `.to()`, merged or disabled LoRA adapters).
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from transformers import StaticCache

from lcot.core.latent import checkpointing_on, latent_loop, latent_step, text_forward

if TYPE_CHECKING:
    from lcot.fast.runner import Runner

BUCKET = 256  # cache sizes are rounded up to a multiple of this, so nearby lengths share one graph
KEEP_PASSES = 8  # graphed passes with gradients (one per input shape) kept
KEEP_PREFIXES = 4  # graphed prefix passes (one per prefix length) per FastLatents
PREFIX_CAPTURE_AT = 2  # a prefix length is captured the 2nd time it comes (lengths seen once cost no capture)
WARMUP = 2  # eager steps on a side stream before a capture (cuBLAS workspaces, lazy inits)
Capture = Callable[[Callable[[], torch.Tensor], Callable[[], None], torch.device],
                   tuple[torch.cuda.CUDAGraph, torch.Tensor]]


def bucket(length: int) -> int:
    """Cache size for sequences of `length` columns."""
    return -(-length // BUCKET) * BUCKET


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


# -- capture -------------------------------------------------------------------------------------------------
def autocast_context() -> torch.autocast | nullcontext:
    """The caller's CUDA autocast, without its weight-cast cache (cached casts would escape the graph)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return nullcontext()


def capture_graph(step: Callable[[], torch.Tensor], rewind: Callable[[], None], device: torch.device
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture `step()` (one pass reading the buffers) as a CUDA graph; returns (graph, output buffer).

    `rewind()` sets the cache's write position back to the step's column. Warm-up steps run eagerly on a
    side stream first (each rewound: they write this very step's keys and values, harmlessly); the capture
    itself runs nothing, so after it the position still points at the step and `graph.replay()` does it.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast_context():
        for _ in range(WARMUP):
            rewind()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    rewind()
    graph = torch.cuda.CUDAGraph()
    # Other threads (NCCL's watchdog under DDP, data-loading helpers) may make CUDA calls meanwhile: only
    # this thread's calls must be capturable.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast_context():
        out = step()
    return graph, out


class FastLatents:
    """A static KV cache of `max_len` slots for `batch_size` rows, and single-token steps on it.

    forward(x, mask4d, position_ids, cols): a multi-token pass through the cache (prefix, suffix);
    run(h, mask4d, position_ids, start, k) -> (inputs, outputs): K latent steps, `latent_loop`'s contract;
    step(x, mask4d, position_ids, col): one single-token step with any input (a decoded token's embedding).
    Every pass writes the cache at its own columns; the columns before it must have been written (by this
    sequence). Steps replay a CUDA graph when `graph` (only on a CUDA model), else run `latent_step` eagerly on
    the same buffers. No gradients: call it under torch.no_grad(). `runner` says which language model a step runs,
    captures the graphs (`runner.capture`) and records what failed.
    """

    def __init__(self, runner: Runner, model, max_len: int, batch_size: int, graph: bool = False) -> None:
        self.runner = runner
        self._model = weakref.ref(model)
        self.max_len, self.batch_size = max_len, batch_size
        self.device = model.device
        self.graph = bool(graph) and self.device.type == "cuda"
        self.cache = StaticCache(config=model.config.text_config, max_cache_len=max_len)
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
        return (self._graph is None and not self._prefix) or self.runner.forward_state(self.model) == self._state

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
        lm = self.runner.eager_step_lm(self.model) if x.shape[1] == 1 else None
        out = text_forward(self.model, x, rows, pos, slice(0, rows.shape[2]), self.cache, lm)
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
            graph, out = self.runner.capture(step, rewind, self.device)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back to eager passes, loudly
            self.prefix_graphs = False
            msg = f"{type(err).__name__}: {err}"
            self.runner.capture_errors.append(msg)
            warnings.warn(f"lcot.fast: CUDA graph capture of the prefix failed ({msg}); running it eagerly",
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
        self._state = self.runner.forward_state(self.model)

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
            out = latent_step(self.model, self.x, self.cache, self.row, self.pos, 0,
                              self.runner.eager_step_lm(self.model))
        self._col = col + 1
        return out

    def _capture(self, col: int) -> None:
        """Capture the step at column `col`; on failure, try again without what may have caused it (lcot.fast.skinny's
        kernels, then the compiled step), and in the end keep eager steps; each fallback warns and is recorded."""
        model, runner = self.model, self.runner
        kernels, compiled = runner.kernels_active(model), runner.step_compiled(model)
        lm = runner.graph_step_lm(model)

        def step() -> torch.Tensor:
            return latent_step(model, self.x, self.cache, self.row, self.pos, 0, lm)

        def rewind() -> None:
            self._col = None
            self._seek(col)

        try:
            self._graph, self._out = runner.capture(step, rewind, self.device)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back, loudly
            msg = f"{type(err).__name__}: {err}"
            rewind()
            if kernels:  # try once with cuBLAS's products: the kernels are to blame only if that capture works
                runner.kernels_failed = True
                self._capture(col)
                if self._graph is None or compiled != runner.step_compiled(model):
                    runner.kernels_failed = False  # it failed without them too, or the compiled step did (reported)
                    return
                runner.kernel_errors.append(msg)
                warnings.warn(f"lcot.fast: the latent step with lcot.fast.skinny's kernels failed ({msg}); "
                              "captured it with cuBLAS's products instead", RuntimeWarning, stacklevel=3)
                return
            if compiled:  # compiling (at the warm-up) or capturing the compiled step failed
                runner.drop_compiled_step(msg)
                warnings.warn(f"lcot.fast: the compiled latent step failed to run or to be captured ({msg}); "
                              "capturing the eager step instead", RuntimeWarning, stacklevel=3)
                return self._capture(col)  # once: the compiled step is gone now
            runner.capture_errors.append(msg)
            self.graph, self._graph, self._out = False, None, None
            warnings.warn(f"lcot.fast: CUDA graph capture failed ({msg}); running eager static-cache steps",
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
    backward (torch.cuda.make_graphed_callables), one pair per input shape, the `keep` newest kept.

    A small model's training step is bound by launching kernels (a pass of the 8M model is ~500 ops forward and
    ~1,000 backward); a replay launches them at once. The replays run the eager pass's kernels. Called with
    (embeds, mask, position_ids); returns the last hidden state, or None where a graph does not apply and the
    caller runs the eager pass: not on CUDA, not training, gradient checkpointing on, a failed capture, or a
    second pass before the first one's backward (bptt:m), whose replay would overwrite the first's buffers.
    `make` stands in for make_graphed_callables in CPU tests.
    """

    def __init__(self, runner: Runner, model, make: Callable | None = None, cuda_only: bool = True,
                 keep: int = KEEP_PASSES) -> None:
        self.runner = runner
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
        state = self.runner.forward_state(model)
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
            with autocast_context():
                # the LM's own token embedding is unused (the pass takes embeddings): allow_unused_input
                fn = self.make(_Pass(model.model.language_model).train(), sample, allow_unused_input=True)
        except Exception as err:  # noqa: BLE001 - a failed capture falls back to the eager pass, loudly
            self.failed = f"{type(err).__name__}: {err}"
            self.runner.capture_errors.append(self.failed)
            warnings.warn(f"lcot.fast: capturing the pass with gradients failed ({self.failed}); "
                          "running it eagerly", RuntimeWarning, stacklevel=4)
            return None
        self.captures += 1
        return fn
