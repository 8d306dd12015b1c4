"""The full gradient of the latent chain without a recurrence with gradients (grad="adjoint").

The chain feeds slot j the output of the position before it: e = S(out(θ, e)), where out are the last hidden
states at columns start-1 .. start+K-2 of one parallel pass given inputs e, and S the shift onto the slots. For a
loss L(θ, e) of that pass, the total gradient is

    dL/dθ = ∂L/∂θ + λᵀ ∂out/∂θ,   with a = ∂L/∂e + Jᵀ λ,  λ = a (one column earlier),  J = ∂out/∂e.

J is strictly lower triangular (slot j's output sees slots ≤ j), so K-1 vector-Jacobian products solve for a
exactly. The products run on a pass over the K-1 slots alone, on a copy of the prefix's cache: far cheaper than
the parallel pass, and no sequence of K steps with gradients is kept. In the backward pass, the gradient that
reaches the pass's hidden states gets λ added at those columns, so the one backward of the parallel pass
yields the full gradient. CPU test: equal to grad="full" (tests/test_adjoint.py).

On a CUDA model the products after the first replay a CUDA graph captured at the second (each is launch-bound:
one token per slot through every layer); LCOT_ADJOINT_GRAPH=0 runs them all eagerly (the same kernels).
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import Cache, DynamicCache

from lcot.core.latent import no_checkpointing, text_forward


def prefix_cache(model, cache: Cache, start: int) -> DynamicCache:
    """A DynamicCache holding the columns before `start` of a filled cache (static or dynamic): the prefix."""
    out = DynamicCache(config=model.config.text_config)
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[:, :, :start], layer.values[:, :, :start], i)  # DynamicCache copies (cat)
    return out


GRAPH_ENV = "LCOT_ADJOINT_GRAPH"
CAPTURE_ERRORS: list[str] = []  # failed captures (each falls back to eager products with a warning)
CAPTURED: list[int] = []  # the K of every captured product graph (tests read it)


class Products:
    """v -> Jᵀv for the pass over the slots (x in, out out), any number of times; on CUDA the second and later
    calls replay a CUDA graph of the first. The pass must have run on `stream` (not the current one), so that
    its backward does too and can be captured there."""

    def __init__(self, x: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        self.x, self.out, self.stream = x, out, stream
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.v = self.result = None

    def eager(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            g, = torch.autograd.grad(self.out, self.x, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.x) if g is None else g

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        v = v.to(self.out.dtype)
        if self.graph is None and self.calls == 2 and self.stream is not None:
            self._capture(v)
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
        with torch.cuda.stream(self.stream):
            self.v = v.clone()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.result = self.eager(self.v)
            finally:
                try:
                    graph.capture_end()
                except RuntimeError as err:  # the capture failed: the products stay eager
                    CAPTURE_ERRORS.append(str(err))
                    warnings.warn(f"lcot: the adjoint products could not be captured as a CUDA graph ({err}); "
                                  "they run eagerly", stacklevel=2)
                    self.v = self.result = None
                    here.wait_stream(self.stream)
                    return
        here.wait_stream(self.stream)
        self.graph = graph
        CAPTURED.append(self.x.shape[1])


def _graph_stream(x: torch.Tensor) -> torch.cuda.Stream | None:
    if x.device.type != "cuda" or os.environ.get(GRAPH_ENV, "1") == "0":
        return None
    return torch.cuda.Stream(x.device)


class _AddAdjoint(torch.autograd.Function):
    """Identity on the hidden states; in the backward pass, adds what `solve` computes from their gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, solve) -> torch.Tensor:
        ctx.solve = solve
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        solve, ctx.solve = ctx.solve, None
        return solve(grad), None


def full_gradient(model, hidden: torch.Tensor, latent_in: torch.Tensor, prefix: DynamicCache,
                  mask4d: torch.Tensor, position_ids: torch.Tensor, start: int) -> torch.Tensor:
    """`hidden` (B, L, H) of a parallel pass whose slots were fed the leaf `latent_in` (B, K, H, requires_grad),
    returned unchanged, but its backward pass carries the gradient through the whole latent chain."""
    k = latent_in.shape[1]
    products = None
    if k > 1:  # the slots 1..K-1 once more, with gradients to their inputs only: J's vector products
        x = latent_in.detach().requires_grad_()
        stream = _graph_stream(x) if k > 2 else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.enable_grad(), no_checkpointing(model), torch.cuda.stream(stream):
            out = text_forward(model, x[:, :-1], mask4d, position_ids, slice(start, start + k - 1), prefix)
        if stream is not None:
            torch.cuda.current_stream(x.device).wait_stream(stream)
        products = Products(x, out, stream)

    def solve(grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            b, = torch.autograd.grad(hidden, latent_in, grad, retain_graph=True, allow_unused=True)
        b = torch.zeros_like(latent_in) if b is None else b.to(latent_in.dtype)
        a = b
        for _ in range(k - 1 if products else 0):  # a_j is exact after K-j products: the chain's last slot first
            a = b + products(a[:, 1:]).to(b.dtype)
        grad = grad.clone()
        grad[:, start - 1:start + k - 1] += a.to(grad.dtype)
        return grad

    return _AddAdjoint.apply(hidden, solve)
