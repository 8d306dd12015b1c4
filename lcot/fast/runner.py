"""The runner: one object that runs latent mode's passes fast, and owns everything that takes.

`Runner` subclasses `lcot.core.latent.Passes` (the reference) and overrides its methods; the values stay those of the
reference (bit for bit in fp32 for the graphed eager step; within a few ulps for compiled ones). It owns the static
caches and CUDA graphs (`lcot.fast.graph`), the compiled language models (`torch.compile`), the kernel copy of the
language model for the steps' graphs (`lcot.fast.skinny`), LoRA's casts (`lcot.fast.adapters`), the adjoint's state
(`lcot.fast.adjoint`) and every failure, each of which turns one thing off for this runner with a warning.
`attach()` gives it to a model (`model.lcot_runner`, read by `lcot.core.latent.passes_of`) and selects lcot's
attention functions for it (`lcot.fast.vision`, `lcot.fast.attention`).

Which path a no-gradient recurrence takes (`fast`):
- "auto": the CUDA-graph path on a CUDA model (not sharded by FSDP), the dynamic cache otherwise;
- "off": the dynamic cache (EagerLatents); "static": a static cache with eager steps;
- "graph": a static cache with CUDA graphs (eager static steps on a CPU).
With gradients a recurrence always runs on the dynamic cache.

`compile_step`: "auto" compiles the one-token step (torch.compile) when its steps first run as CUDA graphs; "on"
compiles it wherever steps run on a static cache; "off" never. `compile`: the language model's passes without a
cache compiled too. `graph_pass`: training's pass with gradients as CUDA graphs (`GraphedPass`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from lcot.core.latent import EagerLatents, Passes, VisionKwargs, attn_mask, no_checkpointing, text_forward
from lcot.fast import skinny
from lcot.fast.adapters import AdapterCasts, tuner_layers
from lcot.fast.adjoint import Adjoint, prefix_cache
from lcot.fast.attention import use_step_attention
from lcot.fast.graph import Capture, FastLatents, GraphedPass, bucket, capture_graph
from lcot.fast.vision import use_packed_attention, vision_kwargs

FAST_MODES = ("auto", "off", "static", "graph")
COMPILE_SETTINGS = ("auto", "on", "off")
KEEP = 4  # FastLatents (graph + static cache) kept, least recently used dropped first
RECOMPILE_LIMIT = 64  # dynamo's default is 8
COMPILE_NOTE = ("lcot: note: the one-token latent step is compiled (torch.compile) when the first batch reaches it, "
                "and once more at the first new sequence length: about a minute each for a 3B or 7B model (the "
                "progress bar waits meanwhile); --compile_step off skips it.")


def allow_recompiles() -> None:
    """Raise dynamo's limit of compiled versions per function to RECOMPILE_LIMIT. transformers runs every model's
    forward inside one wrapper function, whose versions dynamo counts together: the steps (without gradients), the
    adjoint's passes (with them), the parallel pass and each new batch shape add up, and past the limit torch runs
    new ones eagerly, saying so in one log line. transformers' generate sets 64 too, for chunked prefill."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before torch 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def sharded(model) -> bool:
    """FSDP gathers parameters in hooks around each module: nothing a graph could replay."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def resolve(fast: str, device: torch.device | str, is_sharded: bool = False) -> Literal["off", "static", "graph"]:
    """The path a no-gradient recurrence of a model on `device` takes under `fast`."""
    if fast not in FAST_MODES:
        raise ValueError(f"fast must be one of {FAST_MODES}, got {fast!r}")
    cuda = torch.device(device).type == "cuda"
    if fast == "auto":
        return "graph" if cuda and not is_sharded else "off"
    if fast == "graph" and not cuda:
        return "static"
    return fast


def compiles_step(fast: str, compile_step: str, device: torch.device | str) -> bool:
    """Will a runner with these settings compile the one-token step of a model on `device`? (What the commands say
    before a run; a runner decides at its first static cache.)"""
    mode = resolve(fast, device)
    if compile_step == "on":
        return mode in ("static", "graph")
    return compile_step == "auto" and mode == "graph"


class Runner(Passes):
    """Latent mode's passes, fast, for one model (see the module's docstring for `fast`, `compile_step`, `compile`
    and `graph_pass`).

    Switches for comparisons and tests (what `--fast off` turns off at once): `kernels` (lcot.fast.skinny's kernels
    in the steps' graphs; "interpret": also on a CPU under Triton's interpreter), `step_attention` ("flex",
    "sdpa": the grouped step attention without FlexAttention, "stock": transformers' sdpa), `vision` (the packed
    vision tower), `cast_adapters` (LoRA's casts once per chain), `adjoint_graphs` and `adjoint_compile` (the
    adjoint's product graphs and compiled pass). `capture` replaces the CUDA-graph capture (CPU tests).
    """

    def __init__(self, model, fast: str = "auto", compile_step: str | bool = "auto", compile: bool = False,
                 graph_pass: bool = False, *, kernels: bool | str = True, step_attention: str = "flex",
                 vision: bool = True, cast_adapters: bool = True, adjoint_graphs: bool = True,
                 adjoint_compile: bool = True, capture: Capture = capture_graph) -> None:
        compile_step = {True: "on", False: "off"}.get(compile_step, compile_step)
        if fast not in FAST_MODES:
            raise ValueError(f"fast must be one of {FAST_MODES}, got {fast!r}")
        if compile_step not in COMPILE_SETTINGS:
            raise ValueError(f"compile_step must be one of {COMPILE_SETTINGS} or a bool, got {compile_step!r}")
        if step_attention not in ("flex", "sdpa", "stock"):
            raise ValueError(f"step_attention must be flex, sdpa or stock, got {step_attention!r}")
        self._model = weakref.ref(model)
        self.fast, self.compile_step = fast, compile_step
        self.kernels, self.step_attention, self.use_vision = kernels, step_attention, vision
        self.capture = capture
        self.casts = AdapterCasts() if cast_adapters else None
        self.adjoint_state = Adjoint(graphs=adjoint_graphs, compile=adjoint_compile)
        self._kept: OrderedDict[tuple, FastLatents] = OrderedDict()
        self._compiled_step: Callable | None = None  # the language model compiled for one-token static steps
        self._compiled_kernels: tuple[tuple, Callable] | None = None  # (layers copied, compiled?), its step callable
        self._compiled_pass: Callable | None = None  # the language model compiled for passes without a cache
        self.graphed_pass: GraphedPass | None = None
        # what failed (each turns one thing off for this runner, with a warning)
        self.capture_errors: list[str] = []
        self.compile_errors: list[str] = []
        self.kernel_errors: list[str] = []
        self.compile_failed = self.kernels_failed = False
        if compile:
            self.compile_parallel()
        if graph_pass:
            self.graph_parallel()

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this runner was deleted")
        return model

    def attach(self) -> Runner:
        """Give this runner to its model (`model.lcot_runner`) and select lcot's attention functions for it."""
        model = self.model
        if self.use_vision:
            use_packed_attention(model)
        if self.step_attention != "stock":
            use_step_attention(model, flex=self.step_attention == "flex")
        model.lcot_runner = self
        return self

    # -- Passes -----------------------------------------------------------------------------------------------
    def vision(self, model) -> VisionKwargs | None:
        if not self.use_vision:
            return None
        config = model.config.vision_config
        return lambda grid_thw, device: vision_kwargs(grid_thw, config, device)

    def parallel(self, model, embeds: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor
                 ) -> torch.Tensor:
        cols = slice(0, embeds.shape[1])
        if self.graphed_pass is not None and torch.is_grad_enabled() and model.training:
            out = self.graphed_pass(embeds, attn_mask(model, mask4d[:, :, cols, :cols.stop], embeds.dtype),
                                    position_ids[:, :, cols])
            if out is not None:
                return out
        return text_forward(model, embeds, mask4d, position_ids, cols, lm=self._compiled_pass)

    def recurrence(self, model, batch_size: int, length: int) -> EagerLatents | FastLatents:
        mode = resolve(self.fast, model.device, sharded(model))
        if mode == "off" or torch.is_grad_enabled():
            return EagerLatents(model)
        return self.fast_latents(model, batch_size, length, graph=mode == "graph")

    @contextmanager
    def chain(self, model) -> Iterator[None]:
        """No gradients, no checkpointing, and LoRA's adapters cast once for the whole chain under autocast."""
        with torch.no_grad(), no_checkpointing(model):
            if self.casts is None:
                yield
            else:
                with self.casts(model):
                    yield

    def adjoint(self, model, embeds: torch.Tensor, latent_in: torch.Tensor, steps, mask4d: torch.Tensor,
                position_ids: torch.Tensor, start: int) -> torch.Tensor:
        """grad="adjoint" (lcot.fast.adjoint) after the chain ran on `steps`; its pass over the slots is compiled
        where the chain ran the compiled step (on a static cache)."""
        with torch.no_grad():
            prefix = prefix_cache(model, steps.cache, start)
        module = self._compiled_step if not isinstance(steps, EagerLatents) else None
        return self.adjoint_state(model, embeds, latent_in, prefix, mask4d, position_ids, start, module)

    # -- static caches and graphs ---------------------------------------------------------------------------
    def fast_latents(self, model, batch_size: int, length: int, graph: bool = False) -> FastLatents:
        """A FastLatents for `batch_size` rows and at least `length` columns, reused (its graph too) while the
        model's forward is unchanged; at most KEEP kept."""
        graph = bool(graph) and model.device.type == "cuda"
        key = (batch_size, bucket(length), graph, model.training, model.dtype, model.device,
               torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        fl = self._kept.pop(key, None)
        if fl is None or not fl.valid():
            if self._compile_due(graph):
                self._compile_step()
            fl = FastLatents(self, model, bucket(length), batch_size, graph)
        self._kept[key] = fl
        while len(self._kept) > KEEP:
            self._kept.popitem(last=False)
        return fl

    def clear(self) -> None:
        """Drop the kept FastLatents (graphs and static caches); call it after anything else changes the forward."""
        self._kept.clear()

    def forward_state(self, model) -> tuple:
        """What a captured graph depends on besides its buffers: tensor addresses, LoRA switches, and whether its
        products are lcot.fast.skinny's kernels."""
        lm = model.model.language_model
        ptrs = tuple(t.data_ptr() for t in (*lm.parameters(), *lm.buffers()))
        lora = tuple((tuple(getattr(m, "merged_adapters", ())), bool(getattr(m, "disable_adapters", False)),
                      str(getattr(m, "active_adapters", "")))
                     for m in tuner_layers(lm))
        return ptrs, lora, self.kernels_active(model)

    # -- which language model a step runs -------------------------------------------------------------------
    def kernels_active(self, model) -> bool:
        """lcot.fast.skinny's kernels in the steps' graphs: on, Triton importable, a device they run on, not failed."""
        if not self.kernels or self.kernels_failed or not skinny.available():
            return False
        return skinny.runs_on(next(model.parameters()).device, interpret=self.kernels == "interpret")

    def step_compiled(self, model) -> bool:
        return self._compiled_step is not None

    def _compile_due(self, graphed: bool) -> bool:
        if self._compiled_step is not None or self.compile_failed:
            return False
        return self.compile_step == "on" or self.compile_step == "auto" and graphed

    def _compile_step(self) -> None:
        allow_recompiles()
        self._compiled_step = torch.compile(self.model.model.language_model)

    def drop_compiled_step(self, msg: str) -> None:
        """The compiled step failed to run or to be captured: the eager step from now on."""
        self._compiled_step = self._compiled_kernels = None
        self.compile_failed = True
        self.compile_errors.append(msg)

    def eager_step_lm(self, model) -> Callable | None:
        """The language model of a one-token step on a static cache outside a graph (None: the model's own)."""
        return self._compiled_step

    def graph_step_lm(self, model) -> Callable | None:
        """The language model a step's CUDA graph captures: the kernel copy (lcot.fast.skinny.step_copy) where the
        kernels are active, compiled where the step is."""
        lm = model.model.language_model
        if not self.kernels_active(model):
            return self._compiled_step
        layers = (skinny.copy_key(lm), self._compiled_step is not None)
        if self._compiled_kernels is None or self._compiled_kernels[0] != layers:
            copy = skinny.step_copy(lm)
            self._compiled_kernels = (layers, torch.compile(copy) if self._compiled_step is not None else copy)
        return self._compiled_kernels[1]

    # -- training's pass with gradients ------------------------------------------------------------------------
    def compile_parallel(self, enable: bool = True) -> None:
        """torch.compile the language model for passes without a KV cache (the pass with gradients of training, the
        pause feed, stage1): fused kernels, far fewer launches for small models. Kept outside the module tree, so
        checkpoints are unchanged."""
        if enable:
            allow_recompiles()
            self._compiled_pass = torch.compile(self.model.model.language_model, dynamic=True)
        else:
            self._compiled_pass = None

    def graph_parallel(self, enable: bool = True, **kwargs) -> None:
        """Training's pass with gradients as CUDA graphs on a CUDA model (GraphedPass); eager elsewhere."""
        self.graphed_pass = GraphedPass(self, self.model, **kwargs) if enable else None
