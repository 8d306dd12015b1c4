"""The forward primitives of latent mode, used by training, teacher precompute and generation alike.

`embed_inputs` (tokens + vision features), `text_forward` (the language model on a range of columns, through a KV
cache or not), `latent_step` (one continuous-thought step: a hidden state in at one column, its output out) and
`latent_loop` (K steps, the output of each fed back as the input of the next). `EagerLatents` runs them on a
DynamicCache: the reference recurrence.

`Passes` says how latent mode runs its passes; this class is the reference (transformers' modules, eager, a
dynamic cache). `lcot.fast.Runner` subclasses it to run the same primitives faster; a model is given one as its
`lcot_runner` attribute (`passes_of`), and nothing else decides which language model a pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import Cache, DynamicCache, StaticCache

from lcot.core.checks import check
from lcot.core.collate import decode_pixels
from lcot.core.mask import additive

Step = Callable[[torch.Tensor, int], torch.Tensor]  # (input (B, 1, H), slot j) -> output (B, 1, H)
VisionKwargs = Callable[[torch.Tensor, torch.device], dict]  # (image_grid_thw, device) -> the tower's extra inputs


def attn_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool masks work as given with sdpa; eager reads a bool mask as 0/1, so give it the additive form."""
    impl = model.config.text_config._attn_implementation
    return additive(mask, dtype) if impl == "eager" else mask


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_grid_thw: torch.Tensor | None, pixel_lut: torch.Tensor | None = None,
                 vision: VisionKwargs | None = None) -> torch.Tensor:
    """Token embeddings with the vision tower's features scattered in at the image-pad tokens.

    pixel_values may be the cached collator's uint8 codes with their table `pixel_lut` (decoded here, on the
    model's device). `vision(grid_thw, device)` gives the tower extra inputs it would otherwise compute image by
    image (lcot.fast.vision); they replace `image_grid_thw`'s use, so the grids may stay on the CPU.
    """
    vl = model.model
    embeds = vl.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    if pixel_values.dtype == torch.uint8:
        if pixel_lut is None:
            raise ValueError("uint8 pixel_values are the cached collator's codes: pass its pixel_lut too")
        pixel_values = decode_pixels(pixel_values, pixel_lut)
    extra = vision(image_grid_thw, pixel_values.device) if vision is not None else {}
    if not extra:
        image_grid_thw = image_grid_thw.to(pixel_values.device)
    # the tower itself, as get_image_features calls it, without splitting its output per image
    feats = vl.visual(pixel_values.type(vl.visual.dtype), grid_thw=image_grid_thw, **extra).pooler_output
    rows = image_rows(input_ids, feats.shape[0], model.config.image_token_id)
    return embeds.flatten(0, 1).index_copy(0, rows, feats.to(embeds.dtype)).view_as(embeds)


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
    """Keys a pass ending at column `stop` attends over: the columns before `stop`, or with a static cache all of its
    slots (those not written yet are masked: lcot.fast.graph builds such masks)."""
    return cache.get_max_length() if isinstance(cache, StaticCache) else stop


def text_forward(model, embeds: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor, cols: slice,
                 cache: Cache | None = None, lm: Callable | None = None) -> torch.Tensor:
    """Run the language model on columns `cols` (keys: every column before cols.stop, cached or not); returns their
    last hidden states. lm: the language model to run (default: the model's own; lcot.fast passes a compiled one)."""
    start = cols.start or 0
    if cache is None and start:
        raise ValueError("a pass that starts after column 0 needs the cache of the columns before it")
    keys = key_count(cache, cols.stop)
    mask = mask4d[:, :, cols, :keys]
    if mask.shape[-1] != keys:
        raise ValueError(f"the mask covers {mask.shape[-1]} keys, the cache holds {keys}: "
                         "a static cache needs mask rows over all its slots (see lcot.fast.graph)")
    lm = model.model.language_model if lm is None else lm
    out = lm(inputs_embeds=embeds, attention_mask=attn_mask(model, mask, embeds.dtype),
             position_ids=position_ids[:, :, cols], past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state


def with_latents(embeds: torch.Tensor, latent_in: torch.Tensor, start: int) -> torch.Tensor:
    """The input embeddings with the K latent slots from `start` replaced by `latent_in` (B, K, H)."""
    k = latent_in.shape[1]
    return torch.cat([embeds[:, :start], latent_in.to(embeds.dtype), embeds[:, start + k:]], 1)


def latent_step(model, h: torch.Tensor, cache: Cache, mask4d: torch.Tensor, position_ids: torch.Tensor,
                col: int, lm: Callable | None = None) -> torch.Tensor:
    """One continuous-thought step: feed h (B, 1, H) at column `col`, return its output (B, 1, H)."""
    return text_forward(model, h, mask4d, position_ids, slice(col, col + 1), cache, lm)


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
    `lcot.fast.graph.FastLatents` has the same interface.
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


class Passes:
    """How latent mode runs the language model: the reference, which the method needs and nothing more.

    Every pass runs the model's own modules eagerly; a recurrence keeps its keys and values in a DynamicCache.
    `lcot.fast.Runner` overrides these methods (static caches, CUDA graphs, compiled modules, a cheaper full
    gradient); the values are the same. Methods take the model, so one instance (`REFERENCE`) serves any model.
    """

    adjoint: Callable | None = None  # grad="adjoint"'s pass (lcot.fast); without it "adjoint" is computed as "full"

    def vision(self, model) -> VisionKwargs | None:
        """The vision tower's extra inputs for embed_inputs (None: the tower computes them itself)."""
        return None

    def parallel(self, model, embeds: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor
                 ) -> torch.Tensor:
        """One pass over every column without a cache (with or without gradients)."""
        return text_forward(model, embeds, mask4d, position_ids, slice(0, embeds.shape[1]))

    def recurrence(self, model, batch_size: int, length: int) -> EagerLatents:
        """The cache and steps of a recurrence over `length` columns."""
        return EagerLatents(model)

    @contextmanager
    def chain(self, model) -> Iterator[None]:
        """What a recurrence without gradients runs under: no gradients, no checkpointing (it drops the cache)."""
        with torch.no_grad(), no_checkpointing(model):
            yield


REFERENCE = Passes()


def passes_of(model) -> Passes:
    """The runner the model was given (`model.lcot_runner`, set by lcot.fast.Runner.attach), else the reference."""
    return getattr(model, "lcot_runner", None) or REFERENCE
