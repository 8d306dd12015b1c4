"""The linear layers of a single-token step as one Triton kernel each, LoRA's adapters folded in.

A latent step (and a decoding step) multiplies a few rows, one per record, by every weight of the language model:
it is bound by reading the weights. cuBLAS's kernels for two rows read them at about 61% (3B) to 79% (7B) of the
card's copy bandwidth, and peft's LoRA adds three kernels per adapted projection (two small products, an add)
to the base product (benchmarks/RESULTS.md). `skinny_linear` computes y = x W^T + bias + scale * (dropout(x) A^T) B^T
for up to MAX_ROWS rows in two kernels (lcot.fast.skinny_kernel): LoRA's shrink product over slices of K, and one that
streams W once and adds the adapter's expand product to the same accumulator.

`step_copy(lm)` is a copy of the language model's module tree that shares every parameter, buffer and hook with it,
whose linear layers (and peft's LoRA layers) call the kernel for inputs of at most MAX_ROWS rows without gradients;
every other call runs the layer's own forward. The runner (lcot.fast.runner) captures the steps' CUDA graphs from
that copy, so the kernels run inside graphs only; eager steps keep the model's own layers and cuBLAS (a Triton
launch from Python costs more than the kernel). Nothing of the model itself is changed.

On a CPU, Triton's interpreter (TRITON_INTERPRET=1 before triton is first imported, and a runner built with
kernels="interpret") runs the same kernel: the tests compare it there, in fp32, with transformers' and peft's layers.
"""

from __future__ import annotations

import copy
import os
from functools import cache

import torch

from lcot.fast.adapters import lora_layers

MAX_ROWS = 16  # rows of one kernel call (its tile height, skinny_kernel.BM); larger batches go to cuBLAS
PLAIN_MIN_OUTPUTS = 3072  # a weight without LoRA goes to the kernel from this many outputs (see `worth`)


@cache
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device, interpret: bool = False) -> bool:
    """Can the kernel run on `device`: a CUDA device, or (interpret) the CPU under Triton's interpreter."""
    return device.type == "cuda" or (interpret and device.type == "cpu" and interpreting())


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
    from lcot.fast import skinny_kernel

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
    """Can this call go to the kernel: few rows, no gradients, a device Triton runs on (CUDA, or the CPU where the
    interpreter is on), one dtype (autocast's, if on: the products autocast would have cast run as F.linear does)."""
    kind = x.device.type
    return (not torch.is_grad_enabled() and x.shape[:-1].numel() <= MAX_ROWS and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and runs_on(x.device, interpret=True)
            and (not torch.is_autocast_enabled(kind) or x.dtype == torch.get_autocast_dtype(kind)))


# -- the layers -----------------------------------------------------------------------------------------------------
class SkinnyLinear(torch.nn.Linear):
    """A linear layer's copy (sharing its weight, bias and hooks) whose few-row calls run `skinny_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if worth(self.out_features, False) and applies(x, self.weight):
            return skinny_linear(x, self.weight, self.bias)
        return super().forward(x)


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


class SkinnyLoRA:
    """Mixed into a copy of a peft LoRA layer: few-row calls of its one plain adapter run `skinny_linear`, the base
    product and the adapter's in one accumulator; every other call runs peft's forward."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        a = None if args or kwargs else _lora_adapter(self)
        if a is None or not applies(x, base.weight) or not _adapter_dtype_ok(self.lora_A[a].weight, x):
            return super().forward(x, *args, **kwargs)
        shrink = self.lora_A[a].weight
        xa = self.lora_dropout[a](self._cast_input_dtype(x, shrink.dtype))
        return skinny_linear(x, base.weight, base.bias, xa, shrink, self.lora_B[a].weight, self.scaling[a])


@cache
def _skinny_class(cls: type) -> type:
    """`cls` (a peft LoRA layer class) with SkinnyLoRA's forward; made once per class."""
    return type(f"Skinny{cls.__name__}", (SkinnyLoRA, cls), {})


def _swap(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """`module` as class `cls`: one object state (its very __dict__: parameters, buffers, children, hooks and
    flags such as training or peft's adapter switches, set later included); only the class, and so `forward`,
    differs."""
    clone = cls.__new__(cls)
    object.__setattr__(clone, "__dict__", module.__dict__)
    return clone


def step_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers `step_copy` replaces: exactly nn.Linear (subclasses such as quantized layers keep their own
    forward), except those inside a LoRA layer, and peft's LoRA layers."""
    lora = [m for _, m in lora_layers(lm)]
    inside = {id(sub) for m in lora for sub in m.modules() if sub is not m}
    return [m for m in lm.modules() if type(m) is torch.nn.Linear and id(m) not in inside] + lora


def step_copy(lm: torch.nn.Module) -> torch.nn.Module:
    """The language model's module tree again, sharing every tensor and hook with it, its step layers
    (`step_layers`) replaced by their kernel copies (which share the layers' whole state). The containers above
    them are shallow copies: rebuild it when the layers change (LoRA added or merged) or a container's flags do
    (`copy_key`)."""
    swapped = {id(m): m for m in step_layers(lm)}

    def mirror(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in swapped:
            cls = SkinnyLinear if type(module) is torch.nn.Linear else _skinny_class(type(module))
            return _swap(module, cls)
        clone = copy.copy(module)
        clone.__dict__["_modules"] = {name: mirror(child) if child is not None else None
                                      for name, child in module._modules.items()}
        return clone

    return mirror(lm)


def copy_key(lm: torch.nn.Module) -> tuple:
    """What a `step_copy` of `lm` depends on: its step layers, and every module's training flag."""
    return tuple(id(m) for m in step_layers(lm)), tuple(m.training for m in lm.modules())
