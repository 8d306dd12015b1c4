"""Qwen2.5-VL with a 4D attention mask and latent mode, by subclassing (transformers' file is not copied).

Latent mode: the input at latent slot j is the last-layer, final-norm hidden state of position j-1
(the continuous thought is fed back). It runs with a KV cache: the prefix through <abs_vis_token>
once (images included), then K single-token steps (`latent_step`, the one implementation used by
training, teacher precompute and generation), then the rest of the sequence in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import Cache, DynamicCache, Qwen2_5_VLForConditionalGeneration, StaticCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import ModelOutput

from lcot.loss import ce_loss
from lcot.mask import additive
from lcot.vision import decode_pixels, vision_kwargs
from lcot.vision import enabled as vision_enabled

GradMode = Literal["full", "truncated"]
FeedMode = Literal["continuous", "pause"]
FEEDS = ("continuous", "pause")


@dataclass
class LatentOutput(ModelOutput):
    loss: torch.Tensor | None = None  # CE over the labelled tokens
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, L, H), last layer after the final norm
    latent_hidden: torch.Tensor | None = None  # (B, K, H), the outputs at the latent slots


def attn_mask(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool masks work as given with sdpa; eager reads a bool mask as 0/1, so give it the additive form."""
    impl = model.config.text_config._attn_implementation
    return additive(mask, dtype) if impl == "eager" else mask


def embed_inputs(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                 image_grid_thw: torch.Tensor | None, pixel_lut: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings with the vision tower's features scattered in at the image-pad tokens.

    pixel_values may be the cached collator's uint8 codes with their table `pixel_lut` (decoded here, on the
    model's device). The vision tower gets its per-image tensors precomputed (lcot.vision), so it runs without
    Python loops.
    """
    vl = model.model
    embeds = vl.get_input_embeddings()(input_ids)
    if pixel_values is not None and pixel_values.dtype == torch.uint8:
        if pixel_lut is None:
            raise ValueError("uint8 pixel_values are the cached collator's codes: pass its pixel_lut too")
        pixel_values = decode_pixels(pixel_values, pixel_lut)
    if pixel_values is not None:
        if vision_enabled():  # the tower reads the grids only through these: they may stay on the CPU
            extra = vision_kwargs(image_grid_thw, model.config.vision_config, pixel_values.device)
        else:
            extra, image_grid_thw = {}, image_grid_thw.to(pixel_values.device)
        # the tower itself, as get_image_features calls it, without splitting its output per image
        feats = vl.visual(pixel_values.type(vl.visual.dtype), grid_thw=image_grid_thw, **extra).pooler_output
        image_mask, _ = vl.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
    return embeds


def key_count(cache: Cache | None, stop: int) -> int:
    """Keys a pass ending at column `stop` attends over: the columns before `stop`, or with a static cache
    all of its slots (those not written yet are masked: lcot.fast builds such masks)."""
    return cache.get_max_length() if isinstance(cache, StaticCache) else stop


def text_forward(model, embeds: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor,
                 cols: slice, cache: Cache | None = None) -> torch.Tensor:
    """Run the language model on columns `cols` (keys: every column before cols.stop, cached or not)."""
    start = cols.start or 0
    if cache is None and start:
        raise ValueError("a pass that starts after column 0 needs the cache of the columns before it")
    keys = key_count(cache, cols.stop)
    mask = mask4d[:, :, cols, :keys]
    if mask.shape[-1] != keys:
        raise ValueError(f"the mask covers {mask.shape[-1]} keys, the cache holds {keys}: "
                         "a static cache needs mask rows over all its slots (see lcot.fast)")
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attn_mask(model, mask, embeds.dtype),
        position_ids=position_ids[:, :, cols], past_key_values=cache, use_cache=cache is not None)
    return out.last_hidden_state


def latent_step(model, h: torch.Tensor, cache: Cache, mask4d: torch.Tensor, position_ids: torch.Tensor,
                col: int) -> torch.Tensor:
    """One continuous-thought step: feed h (B, 1, H) at column `col`, return its output (B, 1, H)."""
    return text_forward(model, h, mask4d, position_ids, slice(col, col + 1), cache)


def latent_loop(model, h: torch.Tensor, cache: Cache, mask4d: torch.Tensor, position_ids: torch.Tensor,
                start: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K latent steps from the output h (B, 1, H) of the column before `start`.

    Returns (inputs, outputs), each (B, K, H): what was fed to each slot and what each slot produced.
    """
    inputs, outputs = [], []
    for j in range(k):
        inputs.append(h)
        h = latent_step(model, h, cache, mask4d, position_ids, start + j)
        outputs.append(h)
    if not k:
        empty = h[:, :0]
        return empty, empty
    return torch.cat(inputs, 1), torch.cat(outputs, 1)


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


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config.text_config)


def latent_hidden_states(model, input_ids: torch.Tensor, attention_mask_4d: torch.Tensor,
                         position_ids: torch.Tensor, latent_start: int, num_latents: int,
                         pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                         grad: GradMode = "full", fast: str | bool | None = None, reuse_prefix: bool | None = None,
                         feed: FeedMode = "continuous", pixel_lut: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-mode forward. Returns (hidden (B, L, H), latent outputs (B, K, H)).

    feed="continuous": the input of latent slot j is the output of the position before it (the method).
    feed="pause": the control without continuous thought; every slot's input is the (learned) embedding of
    <abs_vis_token_pad> and no hidden state is fed back, so one parallel pass computes everything.

    grad="full": one cached recurrence, gradients flow through the whole chain of latents.
    grad="truncated": the recurrence runs without gradients, then one parallel pass with gradients
    takes the resulting latents as fixed inputs (same forward values, gradient truncated at each latent
    input; far cheaper on a GPU).
    fast: how a recurrence without gradients runs (grad="truncated", or any call under torch.no_grad):
    None = $LCOT_FAST, else "auto" (a static cache and a CUDA graph of `latent_step` on a CUDA model, the
    dynamic cache otherwise), or "off", "static", "graph" (see lcot.fast). With gradients: always the
    dynamic cache.
    reuse_prefix (grad="truncated"): run the prefix once, with gradients, into a dynamic cache; the recurrence
    starts from a detached copy of it and the rest of the sequence attends to it (same values and gradients
    as the recomputing pass, one prefix pass less). Off by default: on an H200 (3B shape, batch 2, K=32) it
    was slower (0.92 s vs 0.85 s a step) and took more memory (1.19x vs 1.03x the SFT step), see
    benchmarks/RESULTS.md. It cannot run with gradient checkpointing (which drops caches).
    """
    from lcot.fast import runner

    if grad not in ("full", "truncated"):
        raise ValueError(f"grad must be 'full' or 'truncated', got {grad!r}")
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    s, k = latent_start, num_latents
    embeds = embed_inputs(model, input_ids, pixel_values, image_grid_thw, pixel_lut)
    batch, length = input_ids.shape
    if feed == "pause":
        hidden = text_forward(model, embeds, attention_mask_4d, position_ids, slice(0, length))
        return hidden, hidden[:, s:s + k]
    if grad == "truncated" and k:
        checkpointing = model.training and checkpointing_on(model)
        if reuse_prefix:
            if checkpointing:
                raise ValueError("reuse_prefix needs the KV cache that gradient checkpointing drops")
            cache = new_cache(model)
            pre = text_forward(model, embeds[:, :s], attention_mask_4d, position_ids, slice(0, s), cache)
            with torch.no_grad():
                steps = runner(model, batch, length, fast)
                steps.load_prefix(cache)
                latent_in, _ = steps.run(pre[:, -1:].detach(), attention_mask_4d, position_ids, s, k)
            rest = torch.cat([latent_in.to(embeds.dtype), embeds[:, s + k:]], 1)
            post = text_forward(model, rest, attention_mask_4d, position_ids, slice(s, length), cache)
            return torch.cat([pre, post], 1), post[:, :k]
        with torch.no_grad(), no_checkpointing(model):
            steps = runner(model, batch, length, fast)
            h = steps.forward(embeds[:, :s], attention_mask_4d, position_ids, slice(0, s))
            latent_in, _ = steps.run(h[:, -1:], attention_mask_4d, position_ids, s, k)
        embeds = torch.cat([embeds[:, :s], latent_in.to(embeds.dtype), embeds[:, s + k:]], 1)
        hidden = text_forward(model, embeds, attention_mask_4d, position_ids, slice(0, length))
        return hidden, hidden[:, s:s + k]
    if model.training and torch.is_grad_enabled() and checkpointing_on(model):
        raise ValueError("gradient checkpointing drops the KV cache the full-gradient recurrence needs: "
                         "use grad='truncated' (--latent_grad truncated) with gradient checkpointing")
    steps = runner(model, batch, length, fast)  # the dynamic cache whenever gradients are on
    pre = steps.forward(embeds[:, :s], attention_mask_4d, position_ids, slice(0, s))
    _, latents = steps.run(pre[:, -1:], attention_mask_4d, position_ids, s, k)
    post = steps.forward(embeds[:, s + k:], attention_mask_4d, position_ids, slice(s + k, length))
    return torch.cat([pre, latents, post], 1), latents


class LatentQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that also takes `attention_mask_4d` (B, 1, L, L) and `latent_mode`.

    Loads any Qwen2.5-VL checkpoint with from_pretrained; saved checkpoints load in the stock class.
    """

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attention_mask_4d: torch.Tensor | None = None,
                latent_mode: bool = False, latent_start: int | None = None, num_latents: int = 0,
                grad: GradMode = "full", fast: str | bool | None = None, reuse_prefix: bool | None = None,
                feed: FeedMode = "continuous", pixel_lut: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, **kwargs):
        if not latent_mode:
            if pixel_values is not None and pixel_values.dtype == torch.uint8:
                pixel_values = decode_pixels(pixel_values, pixel_lut)
            if attention_mask_4d is not None:
                if position_ids is None:
                    raise ValueError("attention_mask_4d needs explicit position_ids (the collator gives them)")
                attention_mask = attn_mask(self, attention_mask_4d, self.dtype)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   pixel_values=pixel_values, image_grid_thw=image_grid_thw, labels=labels,
                                   **kwargs)
        if attention_mask_4d is None or position_ids is None or latent_start is None:
            raise ValueError("latent_mode needs attention_mask_4d, position_ids and latent_start (from the collator)")
        hidden, latents = latent_hidden_states(self, input_ids, attention_mask_4d, position_ids, latent_start,
                                               num_latents, pixel_values, image_grid_thw, grad, fast,
                                               reuse_prefix, feed, pixel_lut)
        loss = ce_loss(self.lm_head, hidden, labels) if labels is not None else None
        logits = self.lm_head(hidden) if return_logits else None
        return LatentOutput(loss=loss, logits=logits, hidden_states=hidden, latent_hidden=latents)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, recording the stock architecture so any Qwen2.5-VL tool loads it."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        self.config.architectures = [Qwen2_5_VLForConditionalGeneration.__name__]
        self.config.to_json_file(str(Path(save_directory) / "config.json"))
        return out


# transformers maps stock checkpoint keys (model.layers.*) to its classes only for its own classes;
# a subclass must register the same mapping to load real Qwen2.5-VL checkpoints.
register_checkpoint_conversion_mapping(
    LatentQwen2_5_VL.__name__, get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"), overwrite=True)
