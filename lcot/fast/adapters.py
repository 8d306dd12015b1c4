"""LoRA adapters cast once to the autocast dtype for the passes without gradients (the latent chain).

peft keeps adapter weights in fp32 while the model is bf16 (`get_peft_model(..., autocast_adapter_dtype=True)`),
and under the trainer's bf16 autocast each adapter product casts its weights again at every call: two more
kernels per adapted projection at every latent step (196 projections at 7B), inside the K-step chain.
An `AdapterCasts` (the runner's, entered around each chain) casts them once per chain, into kept frozen
parameters (fixed addresses, so the chain's CUDA graphs stay valid), and lets the passes inside read those in place
of the originals. Autocast would have made the same values, so every product is unchanged; with LoRA dropout on,
the dropout draws its masks on bf16 inputs instead of fp32 ones, which is another draw of the same distribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's adapter-carrying layers, of any method (they keep `merged_adapters`), in module order."""
    return [m for m in model.modules() if hasattr(m, "merged_adapters")]


def lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """peft's LoRA layers (a base layer with `lora_A` and `lora_B` dicts of products), with their names. The one
    definition lcot uses: these casts, lcot.fast.skinny's kernels, the runner's checks (via tuner_layers)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "merged_adapters") and hasattr(m, "lora_A")]


def adapter_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """peft's LoRA product layers (those in its `lora_A` and `lora_B` dicts), with their names."""
    return [(f"{n}.{d}.{key}", sub) for n, m in lora_layers(model) for d in ("lora_A", "lora_B")
            for key, sub in getattr(m, d).items() if sub._parameters]


def adapter_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of peft's LoRA product layers."""
    return [p for _, m in adapter_layers(model) for p in m._parameters.values() if p is not None]


class AdapterCasts:
    """The kept casts of one model's LoRA weights (frozen parameters: the same objects every chain, for graphs and
    dynamo), by parameter name; calling it gives the context that swaps them in."""

    def __init__(self) -> None:
        self.kept: dict[str, torch.nn.Parameter] = {}

    def _cast(self, name: str, p: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
        c = self.kept.get(name)
        if c is None or c.shape != p.shape or c.dtype != dtype or c.device != p.device:
            c = self.kept[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=p.device),
                                                     requires_grad=False)
        return c

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[int]:
        """Within the block (no gradients, autocast on), the LoRA layers' fp32 parameters are replaced by their casts
        to the autocast dtype; the originals are put back after. Yields how many were replaced (0: nothing done).

        The layers' parameter entries are swapped, not the parameters' data: the original parameters stay
        untouched, so their gradient accumulators, and the hooks DDP keeps on them, survive."""
        layers = [] if torch.is_grad_enabled() else adapter_layers(model)
        kind = next(iter(layers[0][1]._parameters.values())).device.type if layers else "cpu"
        todo = [(m, key, f"{n}.{key}", p) for n, m in layers for key, p in m._parameters.items()
                if p is not None and p.dtype == torch.float32] if torch.is_autocast_enabled(kind) else []
        if not todo:
            yield 0
            return
        dtype = torch.get_autocast_dtype(kind)
        casts = [self._cast(name, p, dtype) for _, _, name, p in todo]
        torch._foreach_copy_(casts, [p for *_, p in todo])
        try:
            for (m, key, _, _), c in zip(todo, casts, strict=True):
                m._parameters[key] = c
            yield len(todo)
        finally:
            for m, key, _, p in todo:
                m._parameters[key] = p
