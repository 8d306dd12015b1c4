"""The speed machinery: how latent mode's passes run fast on a GPU, behind one object, `lcot.fast.Runner`.

Static KV caches and CUDA graphs (graph), the full gradient without a recurrence with gradients (adjoint), the
steps' linear layers as Triton kernels (skinny, skinny_kernel), grouped step attention (attention), LoRA's casts
(adapters) and the vision tower without per-image loops (vision). It imports from lcot.core and the leaves only;
lcot.core never imports it. Without it (`--fast off`), the kit runs the reference passes of lcot.core.latent.
"""

from lcot.fast.runner import COMPILE_SETTINGS, FAST_MODES, Runner

__all__ = ["COMPILE_SETTINGS", "FAST_MODES", "Runner"]
