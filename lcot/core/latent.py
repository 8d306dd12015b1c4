"""The forward primitives of latent mode, used by training, teacher precompute and generation alike.

`embed_inputs` (tokens + vision features), `text_forward` (the language model on a range of columns, through
a KV cache or not), `latent_step` (one continuous-thought step: a hidden state in at one column, its output
out) and `latent_loop` (K steps, the output of each fed back as the input of the next). `EagerLatents` runs
them on a DynamicCache: the reference recurrence; `lcot.core.graph` runs the same `latent_step` on a static
cache, captured as a CUDA graph.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import Cache, DynamicCache, StaticCache

from lcot.core.checks import check
from lcot.core.mask import additive
from lcot.core.vision import decode_pixels, vision_kwargs
from lcot.core.vision import enabled as vision_enabled

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (input (B, 1, H), slot j) -> output (B, 1, H)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled LM, passes without a cache
_COMPILED_STEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled LM, one-token static steps
# model -> a callable (embeds, mask, position_ids) -> last hidden state, or None where it does not apply: the pass
# with gradients as CUDA graphs (lcot.core.graph.GraphedPass)
_GRAPHED_PASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


RECOMPILE_LIMIT = 64  # dynamo's default is 8


def allow_recompiles() -> None:
    """Raise dynamo's limit of compiled versions per function to RECOMPILE_LIMIT. transformers runs every model's
    forward inside one wrapper function, whose versions dynamo counts together: the steps (without gradients), the
    adjoint's passes (with them), the parallel pass and each new batch shape add up (a 40-step stage3 of the tiny
    model with --compile_step on --latent_grad adjoint made 7), and past the limit torch runs new ones eagerly,
    saying so in one log line. transformers' generate sets 64 too, for chunked prefill."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # the name before torch 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def compile_parallel_pass(model, enable: bool = True) -> None:
    """torch.compile the language model for passes without a KV cache (the pass with gradients of training, the
    pause feed, stage1): fused kernels, far fewer launches for small models. Passes through a cache (the
    prefix, the latent steps, generation) stay eager or CUDA-graphed. Kept outside the module tree, so
    checkpoints are unchanged."""
    if enable:
        allow_recompiles()
        _COMPILED[model] = torch.compile(model.model.language_model, dynamic=True)
    else:
        _COMPILED.pop(model, None)


def compile_steps(model, enable: bool = True) -> None:
    """torch.compile the language model for single-token steps on a static cache (the latent steps and
    decoding of lcot.core.graph, inside its CUDA graph): fused kernels within each step, not bit-identical to the
    eager step (a few fp32 ulps). torch compiles at the first shape and once more, for dynamic shapes, at the next;
    --compile_step (lcot.core.graph.step_compile; on by default where the steps are CUDA graphs) calls it,
    LCOT_COMPILE_STEP=1 turns it on for every FastLatents. Where it fails to run or to be captured in a CUDA
    graph, lcot.core.graph drops it with a warning and graphs the eager step."""
    if enable:
        allow_recompiles()
        _COMPILED_STEP[model] = torch.compile(model.model.language_model)
    else:
        _COMPILED_STEP.pop(model, None)


def attn_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool masks work as given with sdpa; eager reads a bool mask as 0/1, so give it the additive form."""
    impl = model.config.text_config._attn_implementation
    return additive(mask, dtype) if impl == "eager" else mask


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_grid_thw: torch.Tensor | None, pixel_lut: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with the vision tower's features scattered in at the image-pad tokens.

    pixel_values may be the cached collator's uint8 codes with their table `pixel_lut` (decoded here, on the
    model's device). The vision tower gets its per-image tensors precomputed (lcot.core.vision), so it runs
    without Python loops; it reads `image_grid_thw` only through them, so the grids may stay on the CPU.
    """
    vl = model.model
    embeds = vl.get_input_embeddings()(input_ids)
    if pixel_values is not None and pixel_values.dtype == torch.uint8:
        if pixel_lut is None:
            raise ValueError("uint8 pixel_values are the cached collator's codes: pass its pixel_lut too")
        pixel_values = decode_pixels(pixel_values, pixel_lut)
    if pixel_values is not None:
        if vision_enabled():
            extra = vision_kwargs(image_grid_thw, model.config.vision_config, pixel_values.device)
        else:
            extra, image_grid_thw = {}, image_grid_thw.to(pixel_values.device)
        # the tower itself, as get_image_features calls it, without splitting its output per image
        feats = vl.visual(pixel_values.type(vl.visual.dtype), grid_thw=image_grid_thw, **extra).pooler_output
        rows = image_rows(input_ids, feats.shape[0], model.config.image_token_id)
        embeds = embeds.flatten(0, 1).index_copy(0, rows, feats.to(embeds.dtype)).view_as(embeds)
    return embeds


def image_rows(input_ids: torch.Tensor, count: int, image_token_id: int) -> torch.Tensor:
    """Flat indices (into B*L) of the image-pad tokens, which must number `count` (the vision features' rows).

    transformers' masked_scatter and its check read the count back to the host (in the forward and again in the
    backward), stalling the GPU; a size known beforehand (nonzero_static) and lcot.core.checks do not.
    """
    flat = (input_ids == image_token_id).flatten()
    check(flat.sum() == count, f"the image-pad tokens and the {count} vision features differ in number: input_ids "
          "and pixel_values/image_grid_thw do not belong together (build batches with lcot's collator)")
    return torch.nonzero_static(flat, size=count).squeeze(1)


def key_count(cache: Cache | None, stop: int) -> int:
    """Keys a pass ending at column `stop` attends over: the columns before `stop`, or with a static cache
    all of its slots (those not written yet are masked: lcot.core.graph builds such masks)."""
    return cache.get_max_length() if isinstance(cache, StaticCache) else stop


def text_forward(model, embeds: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor,
                 cols: slice, cache: Cache | None = None, plain: bool = False,
                 module: Callable | None = None) -> torch.Tensor:
    """Run the language model on columns `cols` (keys: every column before cols.stop, cached or not).
    plain=True: the module itself, never --graph_pass's CUDA graphs nor --compile's compiled module (grad="adjoint"
    runs a second backward through the pass, which neither allows). module: run this language model instead
    (lcot.core.adjoint's compiled pass over the slots)."""
    start = cols.start or 0
    if cache is None and start:
        raise ValueError("a pass that starts after column 0 needs the cache of the columns before it")
    keys = key_count(cache, cols.stop)
    mask = mask4d[:, :, cols, :keys]
    if mask.shape[-1] != keys:
        raise ValueError(f"the mask covers {mask.shape[-1]} keys, the cache holds {keys}: "
                         "a static cache needs mask rows over all its slots (see lcot.core.graph)")
    lm = model.model.language_model
    graphed = _GRAPHED_PASS.get(model) if cache is None and torch.is_grad_enabled() and model.training and not plain \
        else None
    if graphed is not None:
        out = graphed(embeds, attn_mask(model, mask, embeds.dtype), position_ids[:, :, cols])
        if out is not None:
            return out
    if module is not None:
        lm = module
    elif cache is None and not plain:
        lm = _COMPILED.get(model, lm)
    elif embeds.shape[1] == 1 and isinstance(cache, StaticCache):
        lm = _COMPILED_STEP.get(model, lm)
    out = lm(
        inputs_embeds=embeds, attention_mask=attn_mask(model, mask, embeds.dtype),
        position_ids=position_ids[:, :, cols], past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state


def with_latents(embeds: torch.Tensor, latent_in: torch.Tensor, start: int) -> torch.Tensor:
    """The input embeddings with the K latent slots from `start` replaced by `latent_in` (B, K, H)."""
    k = latent_in.shape[1]
    return torch.cat([embeds[:, :start], latent_in.to(embeds.dtype), embeds[:, start + k:]], 1)


def latent_step(model, h: torch.Tensor, cache: Cache, mask4d: torch.Tensor, position_ids: torch.Tensor,
                col: int) -> torch.Tensor:
    """One continuous-thought step: feed h (B, 1, H) at column `col`, return its output (B, 1, H)."""
    return text_forward(model, h, mask4d, position_ids, slice(col, col + 1), cache)


def latent_loop(step: Step, h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K latent steps from the output h (B, 1, H) of the column before the first slot: the input of slot j is
    the output of slot j-1. `step(x, j)` runs slot j (eager or graphed).

    Returns (inputs, outputs), each (B, K, H): what was fed to each slot and what each slot produced.
    """
    if not k:
        empty = h[:, :0]
        return empty, empty
    inputs, outputs = [], []
    for j in range(k):
        inputs.append(h)
        h = step(h, j)
        outputs.append(h)
    return torch.cat(inputs, 1), torch.cat(outputs, 1)


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config.text_config)


class EagerLatents:
    """The reference recurrence: a DynamicCache and eager steps (with or without gradients).

    forward(x, mask4d, position_ids, cols): a multi-token pass through the cache (prefix, suffix);
    run(h, mask4d, position_ids, start, k) -> (inputs, outputs): K latent steps from column `start`;
    step(x, mask4d, position_ids, col): one single-token step with any input (a decoded token's embedding).
    `lcot.core.graph.FastLatents` has the same interface.
    """

    def __init__(self, model) -> None:
        self.model, self.cache = model, new_cache(model)

    def forward(self, x: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, cols: slice) -> torch.Tensor:
        return text_forward(self.model, x, mask4d, position_ids, cols, self.cache)

    def run(self, h: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, start: int, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        return latent_loop(lambda x, j: self.step(x, mask4d, position_ids, start + j), h, k)

    def step(self, x: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, col: int) -> torch.Tensor:
        return latent_step(self.model, x, self.cache, mask4d, position_ids, col)


@contextmanager
def no_checkpointing(model) -> Iterator[None]:
    """Gradient checkpointing silently drops the KV cache; the no-grad recurrence does not need it anyway."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.model.language_model.layers)
