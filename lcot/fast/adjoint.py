"""The full gradient of the latent chain without a recurrence with gradients (grad="adjoint").

The chain feeds slot j the output of the position before it: e = S(out(θ, e)), where out are the last hidden
states at columns start-1 .. start+K-2 of one parallel pass given inputs e, and S the shift onto the slots. For a
loss L(θ, e) of that pass, the total gradient is

    dL/dθ = ∂L/∂θ + λᵀ ∂out/∂θ,   with a = ∂L/∂e + Jᵀ λ,  λ = a (one column earlier),  J = ∂out/∂e.

J is strictly lower triangular (slot j's output sees slots ≤ j), so K-1 vector-Jacobian products solve for a
exactly. The products run on a pass over the K-1 slots alone, on a copy of the prefix's cache: far cheaper than
the parallel pass, and no sequence of K steps with gradients is kept. In the backward pass, ∂L/∂e costs one more
backward through the parallel pass (to its inputs only; with gradient checkpointing, one more recomputation),
then the gradient that reaches the pass's hidden states gets λ added at those columns, so the backward of the
parallel pass yields the full gradient. One backward per forward. Exact without dropout (each pass draws its own
masks). CPU test: equal to grad="full" (tests/test_adjoint.py). Needs non-reentrant gradient checkpointing, if
any (lcot's default): a reentrant checkpoint refuses torch.autograd.grad.

On a CUDA model the products after the first replay a CUDA graph captured at the second (each is launch-bound: one
token per slot through every layer). Where the one-token step is compiled (--compile_step) and the chain ran it (on
the static cache of lcot.fast.graph), the pass over the slots runs that compiled language model too, so that each
product is AOTAutograd's fused backward (fewer, fused kernels; rounding differs by fp32 ulps); a compile that fails
is dropped with a warning. `Adjoint` holds what this needs across steps (graph pools, streams, failures); the
runner (lcot.fast.runner) owns one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch
from transformers import Cache, DynamicCache

from lcot.core.latent import new_cache, no_checkpointing, text_forward, with_latents

GRAPH_FROM_K = 4  # fewer slots: too few products to pay for a capture


def prefix_cache(model, cache: Cache, start: int) -> DynamicCache:
    """A DynamicCache holding the columns before `start` of a filled cache (static or dynamic): the prefix."""
    out = new_cache(model)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :start], layer.values[:, :, :start], i)  # DynamicCache copies (cat)
    return out


def _not_donated():
    """AOTAutograd's compiled backward frees ("donates") its buffers unless told not to, when it is compiled and
    again when it runs (its check reads the flag then): the products run it once each (retain_graph)."""
    return torch._functorch.config.patch(donated_buffer=False)


class Products:
    """v -> Jᵀv for the pass over the slots (x in, out out), any number of times; on CUDA a graph of the
    product is captured at the second call and replayed from then on (the first, eager, was its warm-up). The
    pass must have run on `stream` (not the current one), so that its backward does too and can be captured
    there."""

    def __init__(self, state: Adjoint, x: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream | None,
                 rebuild: Callable[[Exception], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.state, self.x, self.out, self.stream = state, x, out, stream
        self.rebuild = rebuild  # a compiled pass: (x, out) of the pass run again uncompiled, if its first product fails
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.v = self.result = None

    def eager(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), _not_donated():
            g, = torch.autograd.grad(self.out, self.x, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.x) if g is None else g

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        v = v.to(self.out.dtype)
        if self.graph is None and self.calls == 2 and self.stream is not None:
            self._capture(v)
        rebuild, self.rebuild = self.rebuild, None  # only ever for the first product
        if self.graph is None and rebuild is not None:
            try:
                return self.eager(v)
            except Exception as err:  # noqa: BLE001 - the compiled backward failed: the uncompiled pass, loudly
                self.x, self.out = rebuild(err)
        if self.graph is None:
            return self.eager(v)
        self.v.copy_(v)
        self.graph.replay()
        return self.result

    def _capture(self, v: torch.Tensor) -> None:
        """Record one product on the pass's stream (the first, eager product was its warm-up)."""
        here = torch.cuda.current_stream(v.device)
        self.stream.wait_stream(here)
        graph = torch.cuda.CUDAGraph()
        pool, _ = self.state.pools.get(v.device) or (torch.cuda.graph_pool_handle(), None)
        with torch.cuda.stream(self.stream):
            self.v = v.clone()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.result = self.eager(self.v)
            finally:
                try:
                    graph.capture_end()
                except RuntimeError as err:  # the capture failed: the products stay eager, from now on
                    self.state.errors.append(f"adjoint products: {err}")
                    self.state.graphs = False
                    warnings.warn(f"lcot: the adjoint products could not be captured as a CUDA graph ({err}); "
                                  "they run eagerly for the rest of this process", stacklevel=2)
                    self.v = self.result = None
                    here.wait_stream(self.stream)
                    return
        here.wait_stream(self.stream)
        self.graph = graph
        self.state.pools[v.device] = (pool, graph)
        self.state.captured[self.x.shape[1]] += 1


class _AddAdjoint(torch.autograd.Function):
    """Identity on the hidden states; in the backward pass, adds what `solve` computes from their gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, solve) -> torch.Tensor:
        ctx.solve = solve
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        solve, ctx.solve = ctx.solve, None  # released: the output may outlive the backward pass
        if solve is None:
            raise RuntimeError("grad='adjoint' supports one backward pass per forward (retain_graph=True and a "
                               "second backward are not supported); use grad='full' for that")
        return solve(grad), None


class Adjoint:
    """grad="adjoint" for one model: the pass and what it keeps between steps. One memory pool per device for all
    product graphs (each step's graph reuses the memory of the one before: they run one after another, and an old
    one is never replayed; the last is kept so that the pool stays alive), one side stream per device (the
    allocator reuses a freed block only on the stream it was allocated on), and what failed: a capture turns the
    graphs off (`graphs`), a compile turns the compiled pass off (`compile_failed`); `errors` lists them."""

    def __init__(self, graphs: bool = True, compile: bool = True) -> None:
        self.graphs, self.compile = graphs, compile
        self.compile_failed = False
        self.errors: list[str] = []
        self.captured: Counter[int] = Counter()  # K -> product graphs captured
        self.pools: dict[torch.device, tuple] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, x: torch.Tensor) -> torch.cuda.Stream | None:
        """The side stream for the pass over the slots when its products will be graphed, else None."""
        if x.device.type != "cuda" or x.shape[1] < GRAPH_FROM_K or not self.graphs:
            return None
        if x.device not in self.streams:
            self.streams[x.device] = torch.cuda.Stream(x.device)
        return self.streams[x.device]

    def _compile_failed(self, err: Exception) -> None:
        """A compiled pass over the slots failed (building it, or its backward): drop it, loudly. Running out of
        memory is not a compile failure: that propagates."""
        if isinstance(err, torch.OutOfMemoryError):
            raise err
        msg = f"{type(err).__name__}: {err}"
        self.compile_failed = True
        self.errors.append(f"compiled pass over the slots: {msg}")
        warnings.warn(f"lcot.fast.adjoint: the compiled pass over the slots failed ({msg}); running it uncompiled",
                      RuntimeWarning, stacklevel=4)

    def _slots_pass(self, model, latent_in: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor,
                    start: int, prefix: DynamicCache, module: Callable | None
                    ) -> tuple[torch.Tensor, torch.Tensor, Callable | None, torch.cuda.Stream | None]:
        """The slots 0..K-2 once more, fed `latent_in`, with gradients to their inputs only: (x, out, module run, the
        products' stream it ran on). `module`: a compiled language model to run it with; a compiled forward that
        fails runs again uncompiled. The pass appends its columns to `prefix` (a new tensor per layer: its first
        `start` columns keep the prefix, see `prefix_cache`)."""
        x = latent_in.detach().requires_grad_()
        k, stream = x.shape[1], self._stream(x)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(x.device))
        cols = slice(start, start + k - 1)
        with no_checkpointing(model), torch.cuda.stream(stream):  # (called with gradients on)
            out = None
            if module is not None:
                try:
                    with _not_donated():
                        out = text_forward(model, x[:, :-1], mask4d, position_ids, cols, prefix, module)
                except Exception as err:  # noqa: BLE001 - a failed compile falls back to the uncompiled pass, loudly
                    self._compile_failed(err)
                    module, prefix = None, prefix_cache(model, prefix, start)  # as it came, whatever it left
            if out is None:
                out = text_forward(model, x[:, :-1], mask4d, position_ids, cols, prefix)
        if stream is not None:
            torch.cuda.current_stream(x.device).wait_stream(stream)
        return x, out, module, stream

    def __call__(self, model, embeds: torch.Tensor, latent_in: torch.Tensor, prefix: DynamicCache,
                 mask4d: torch.Tensor, position_ids: torch.Tensor, start: int, module: Callable | None = None
                 ) -> torch.Tensor:
        """The parallel pass with gradients (hidden states (B, L, H)) of `embeds` with the K slots from `start` fed
        the chain's `latent_in` (B, K, H), whose backward pass carries the gradient through the whole latent chain.
        `prefix`: the chain's cache of the columns before `start` (prefix_cache). module: the compiled language model
        for the pass over the slots (None: uncompiled), unless a compile failed before."""
        module = None if self.compile_failed or not self.compile else module
        latent_in = latent_in.detach().to(embeds.dtype).requires_grad_()
        hidden = text_forward(model, with_latents(embeds, latent_in, start), mask4d, position_ids,
                              slice(0, embeds.shape[1]))
        k = latent_in.shape[1]
        products = None
        if k > 1:  # J's vector products, on a pass over the slots
            x, out, module, stream = self._slots_pass(model, latent_in, mask4d, position_ids, start, prefix, module)
            rebuild = None
            if module is not None:  # its backward is compiled (or checked) at the first product: may fail there

                def rebuild(err: Exception) -> tuple[torch.Tensor, torch.Tensor]:
                    self._compile_failed(err)
                    again = prefix_cache(model, prefix, start)  # the compiled pass appended its columns to prefix
                    with torch.enable_grad():  # (inside the backward pass)
                        return self._slots_pass(model, latent_in, mask4d, position_ids, start, again, None)[:2]

            products = Products(self, x, out, stream, rebuild)

        def solve(grad: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                b, = torch.autograd.grad(hidden, latent_in, grad, retain_graph=True, allow_unused=True)
            b = torch.zeros_like(latent_in, dtype=torch.float32) if b is None else b.float()
            a = b
            for _ in range(k - 1 if products else 0):  # a_j is exact after K-j products: the chain's last slot first
                a = b + products(a[:, 1:]).float()
            grad = grad.clone()
            grad[:, start - 1:start + k - 1] += a.to(grad.dtype)
            return grad

        return _AddAdjoint.apply(hidden, solve)
