"""LoRA adapters cast once to the autocast dtype for the passes without gradients (the latent chain).

peft keeps adapter weights in fp32 while the model is bf16 (`get_peft_model(..., autocast_adapter_dtype=True)`),
and under the trainer's bf16 autocast each adapter product casts its weights again at every call: two more
kernels per adapted projection at every latent step (196 projections at 7B), inside the K-step chain.
`autocast_adapters(model)` casts them once per chain, into kept buffers (fixed addresses, so the chain's CUDA
graphs stay valid), and lets the passes inside read those buffers. Autocast would have made the same values, so
every product is unchanged; with LoRA dropout on, the dropout draws its masks on bf16 inputs instead of fp32
ones, which is another draw of the same distribution. LCOT_CAST_ADAPTERS=0 turns it off.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV = "LCOT_CAST_ADAPTERS"
_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {weight name: its cast}, reused


def adapter_weights(model: torch.nn.Module, names: bool = False) -> list:
    """The weights of peft's LoRA products (the layers in its `lora_A` and `lora_B` dicts); (name, weight) pairs
    with names=True."""
    pairs = [(n, p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    return pairs if names else [p for _, p in pairs]


def _buffer(model: torch.nn.Module, name: str, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    kept = _BUFFERS.setdefault(model, {})
    buf = kept.get(name)
    if buf is None or buf.shape != p.shape or buf.dtype != dtype or buf.device != p.device:
        buf = kept[name] = torch.empty(p.shape, dtype=dtype, device=p.device)
    return buf


@contextmanager
def autocast_adapters(model: torch.nn.Module) -> Iterator[int]:
    """Within the block (no gradients, autocast on), fp32 LoRA weights hold their casts to the autocast dtype;
    restored after. Yields how many weights were swapped (0: nothing applies, nothing done)."""
    weights = [] if torch.is_grad_enabled() or os.environ.get(ENV, "1") == "0" else adapter_weights(model, True)
    kind = weights[0][1].device.type if weights else "cpu"
    named = [(n, p) for n, p in weights if p.dtype == torch.float32] if torch.is_autocast_enabled(kind) else []
    if not named:
        yield 0
        return
    dtype = torch.get_autocast_dtype(kind)
    todo = [p for _, p in named]
    casts = [_buffer(model, n, p, dtype) for n, p in named]
    torch._foreach_copy_(casts, [p.data for p in todo])
    kept = [p.data for p in todo]
    for p, c in zip(todo, casts, strict=True):
        p.data = c
    try:
        yield len(todo)
    finally:
        for p, k in zip(todo, kept, strict=True):
            p.data = k
