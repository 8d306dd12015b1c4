"""The linear layers of a single-token step as one Triton kernel each, LoRA's adapters folded in.

A latent step (and a decoding step) multiplies a few rows, one per record, by every weight of the language model:
it is bound by reading the weights. cuBLAS's kernels for two rows read them at about 61% (3B) to 79% (7B) of the
card's copy bandwidth, and peft's LoRA adds three kernels per adapted projection (two small products, an add)
to the base product: at 7B 588 more kernels, 2.3 ms of a 9.35 ms compiled step (benchmarks/RESULTS.md).
`skinny_linear` computes y = x W^T + bias + scale * (dropout(x) A^T) B^T for up to MAX_ROWS rows in two kernels
(lcot.core.skinny_kernel): LoRA's shrink product over slices of K, and one that streams W once and adds the
adapter's expand product to the same accumulator.

`products(model)` makes the language model's linear layers (and peft's LoRA layers around them) call it for
inputs of at most MAX_ROWS rows without gradients; every other call runs the layer's own forward. lcot.core.graph
enters it around the capture of a step, so the kernels run inside the step's CUDA graph (eager or compiled);
eager steps outside a graph keep cuBLAS (a Triton launch from Python costs more than the kernel). Where Triton
cannot run (no CUDA device, no Triton), nothing changes. LCOT_SKINNY=0 turns it off.

On a CPU, Triton's interpreter (TRITON_INTERPRET=1, LCOT_SKINNY=cpu) runs the same kernel: the tests compare it
there, in fp32, with transformers' and peft's layers.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch

from lcot.core.adapters import lora_layers

ENV = "LCOT_SKINNY"
MAX_ROWS = 16  # rows of one kernel call (its tile height, skinny_kernel.BM); larger batches go to cuBLAS
PLAIN_MIN_OUTPUTS = 3072  # a weight without LoRA goes to the kernel from this many outputs (see `worth`)
FAILED: weakref.WeakSet = weakref.WeakSet()  # models whose step failed with these kernels: left to cuBLAS
ERRORS: list[str] = []
_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [(module, its step forward)]


@cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def mode() -> str:
    """$LCOT_SKINNY: "1" (the default) on CUDA devices, "0" off, "cpu" on CUDA devices and on the CPU through Triton's
    interpreter (the tests; it needs TRITON_INTERPRET=1 before triton is first imported)."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1", "cpu"):
        raise ValueError(f"${ENV} must be 0, 1 or cpu, got {value!r}")
    return value


def runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and mode() == "cpu" and interpreting())


def enabled(model=None) -> bool:
    """On ($LCOT_SKINNY), Triton importable, and for `model`: on a device the kernel runs on, and its step has not
    failed with the kernels."""
    if mode() == "0" or not available():
        return False
    return model is None or (model not in FAILED and runs_on(next(model.parameters()).device))


def config(n: int, k: int, itemsize: int = 2) -> tuple[int, int, int, int]:
    """(BN outputs per program, BK columns per tile, warps, pipeline stages) for an (n, k) weight: the best or
    near-best tiles of benchmarks/skinny_sweep.py for the 3B and 7B projections on an H100 (benchmarks/RESULTS.md),
    for 2-byte weights; 4-byte (fp32) weights take tiles half as wide, so the stages fit in shared memory."""
    if n <= 1024:  # k, v
        bn, bk, stages = 16, 256, 4
    elif k >= 8192:  # down
        bn, bk, stages = (32 if n >= 3072 else 16), 256, 6
    elif n >= 8192:  # gate, up
        bn, bk, stages = 32, 128, 3
    else:  # q, o
        bn, bk, stages = (32 if n >= 3072 else 16), 128, 6
    return bn, bk * 2 // itemsize, 4, stages


def worth(n: int, lora: bool) -> bool:
    """Does the kernel beat cuBLAS here? With LoRA always (it saves the adapter's products' extra kernels); for a
    plain weight where it has at least 3072 outputs. Below that cuBLAS's two-row products were faster (3B down,
    7B k and v), as fast (3B q, o) or at most 4% slower (3B k, v) on an H100 (benchmarks/skinny_sweep.py)."""
    return lora or n >= PLAIN_MIN_OUTPUTS


# -- the operator -------------------------------------------------------------------------------------------------
@torch.library.custom_op("lcot::skinny_linear", mutates_args=(), device_types=("cuda", "cpu"))
def _skinny(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor | None,
            a: torch.Tensor | None, u: torch.Tensor | None, scale: float) -> torch.Tensor:
    from lcot.core import skinny_kernel

    # the kernels read rows with a stride and columns (and the bias) densely
    x, weight, bias, xa, a, u = (t.contiguous() if t is not None else None for t in (x, weight, bias, xa, a, u))
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    tiles = config(weight.shape[0], x.shape[1], weight.element_size())
    skinny_kernel.launch(x, weight, bias, xa, a, u, scale, out, tiles)
    return out


@_skinny.register_fake
def _(x, weight, bias, xa, a, u, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  xa: torch.Tensor | None = None, a: torch.Tensor | None = None, u: torch.Tensor | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias + scale * (xa (..., K) @ a (R, K)^T) @ u (N, R)^T, in x's dtype (fp32
    accumulation): a linear layer and its LoRA adapter (a = lora_A, u = lora_B, xa = the adapter's dropped-out
    input, x itself without dropout). At most MAX_ROWS rows."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {x2.shape[0]}")
    if (a is None) != (u is None):
        raise ValueError("an adapter needs both its products: a (lora_A's weight) and u (lora_B's)")
    if a is not None:
        xa = x2 if xa is None else xa.reshape(x2.shape).to(x.dtype)
        a, u = a.to(x.dtype), u.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    return _skinny(x2, weight, bias, xa, a, u, float(scale)).view(*lead, weight.shape[0])


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can this call go to the kernel: few rows, no gradients, a device Triton runs on, one dtype (autocast's, if
    on: the products autocast would have cast run as F.linear does)."""
    kind = x.device.type
    return (not torch.is_grad_enabled() and x.shape[:-1].numel() <= MAX_ROWS and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and runs_on(x.device)
            and (not torch.is_autocast_enabled(kind) or x.dtype == torch.get_autocast_dtype(kind)))


# -- the layers -----------------------------------------------------------------------------------------------------
def _linear_forward(m: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if worth(m.out_features, False) and applies(x, m.weight):
            return skinny_linear(x, m.weight, m.bias)
        return torch.nn.Linear.forward(m, x)
    return forward


def _lora_adapter(m) -> str | None:
    """The one plain LoRA adapter of a peft layer that is on and unmerged (None: run peft's forward)."""
    if m.disable_adapters or m.merged:
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or active[0] in getattr(m, "lora_variant", {}):
        return None
    a = active[0]
    if getattr(m.lora_B[a], "bias", None) is not None or type(m.base_layer) is not torch.nn.Linear:
        return None
    return a


def _adapter_dtype_ok(shrink: torch.Tensor, x: torch.Tensor) -> bool:
    """The adapter's products run in x's dtype: its weights have it, or autocast would cast them to it. (fp32
    adapters on a bf16 model without autocast: peft's products in fp32.)"""
    return shrink.dtype == x.dtype or torch.is_autocast_enabled(x.device.type)


def _lora_forward(m):
    peft_forward = type(m).forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = m.base_layer
        a = None if args or kwargs else _lora_adapter(m)
        if a is None or not applies(x, base.weight) or not _adapter_dtype_ok(m.lora_A[a].weight, x):
            return peft_forward(m, x, *args, **kwargs)
        shrink = m.lora_A[a].weight
        xa = m.lora_dropout[a](m._cast_input_dtype(x, shrink.dtype))
        return skinny_linear(x, base.weight, base.bias, xa, shrink, m.lora_B[a].weight, m.scaling[a])
    return forward


def step_forwards(model) -> list[tuple[torch.nn.Module, object]]:
    """The language model's linear layers (exactly nn.Linear: subclasses such as quantized layers keep their own
    forward) and peft's LoRA layers (not their lora_A and lora_B products, which the LoRA layer's kernel replaces),
    each with its forward for steps, made once per model and kept, so that a compiled step sees the same functions
    every time."""
    kept = _FORWARDS.get(model)
    lm = model.model.language_model
    lora = [m for _, m in lora_layers(lm)]
    inside = {id(sub) for m in lora for d in (m.lora_A, m.lora_B) for sub in d.values()}
    plain = [m for m in lm.modules() if type(m) is torch.nn.Linear and id(m) not in inside]
    if kept is None or [m for m, _ in kept] != plain + lora:
        kept = _FORWARDS[model] = [(m, _linear_forward(m)) for m in plain] + [(m, _lora_forward(m)) for m in lora]
    return kept


@contextmanager
def products(model) -> Iterator[bool]:
    """Within the block, the language model's linear layers run `skinny_linear` for calls it applies to (see
    `applies`); yields whether it is on."""
    if not enabled(model):
        yield False
        return
    swapped = step_forwards(model)
    before = [m.__dict__.get("forward") for m, _ in swapped]  # a forward set on the instance (hooks), or None
    for m, fn in swapped:
        m.forward = fn
    try:
        yield True
    finally:
        for (m, _), old in zip(swapped, before, strict=True):
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
