"""Qwen2.5-VL with a 4D attention mask and latent mode, by subclassing (transformers' file is not copied).

Latent mode: the input at latent slot j is the last-layer, final-norm hidden state of position j-1
(the continuous thought is fed back). It runs with a KV cache: the prefix through <abs_vis_token>
once (images included), then K single-token steps (lcot.core.latent, eager; lcot.core.graph, a CUDA graph),
then the rest of the sequence in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import ModelOutput

from lcot.core.adapters import autocast_adapters
from lcot.core.adjoint import adjoint_pass, prefix_cache
from lcot.core.graph import runner
from lcot.core.latent import (
    EagerLatents,
    attn_mask,
    checkpointing_on,
    embed_inputs,
    no_checkpointing,
    text_forward,
    with_latents,
)
from lcot.core.loss import ce_loss
from lcot.core.vision import decode_pixels

GradMode = str  # "full", "adjoint", "truncated" or "bptt:m" (see latent_hidden_states)
FeedMode = Literal["continuous", "pause"]
FEEDS = ("continuous", "pause")
BATCH_KEYS = ("input_ids", "attention_mask_4d", "position_ids", "latent_start", "num_latents", "pixel_values",
              "image_grid_thw", "pixel_lut")  # what latent mode reads from a collator batch


@dataclass
class LatentOutput(ModelOutput):
    loss: torch.Tensor | None = None  # CE over the labelled tokens
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # (B, L, H), last layer after the final norm
    latent_hidden: torch.Tensor | None = None  # (B, K, H), the outputs at the latent slots


def bptt_links(grad: GradMode) -> int | None:
    """m of grad="bptt:m" (m >= 0), None for "full", "adjoint" and "truncated"; anything else is an error."""
    if grad in ("full", "adjoint", "truncated"):
        return None
    name, _, m = grad.partition(":")
    if name != "bptt" or not m.isdigit():
        raise ValueError(f"grad must be 'full', 'adjoint', 'truncated' or 'bptt:M' (M >= 0 feedback links), "
                         f"got {grad!r}")
    return int(m)


@contextmanager
def chain_mode(model) -> Iterator[None]:
    """What a recurrence without gradients runs under: no gradients, no checkpointing (it would drop the KV cache)
    and LoRA's adapters cast once for the whole chain under autocast (lcot.core.adapters)."""
    with torch.no_grad(), no_checkpointing(model), autocast_adapters(model):
        yield


def latent_hidden_states(model, batch: Mapping, grad: GradMode = "full", fast: str | bool | None = None,
                         feed: FeedMode = "continuous", answer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent-mode forward of a collator batch (lcot.core.collate; on the model's device, except that
    `image_grid_thw` may stay on the CPU). Returns (hidden (B, L, H), latent outputs (B, K, H)).

    feed="continuous": the input of latent slot j is the output of the position before it (the method).
    feed="pause": the control without continuous thought; every slot's input is the (learned) embedding of
    <abs_vis_token_pad> and no hidden state is fed back, so one parallel pass computes everything (as for K=0).

    grad="full": one cached recurrence, gradients flow through the whole chain of latents.
    grad="truncated": the recurrence runs without gradients, then one parallel pass with gradients
    takes the resulting latents as fixed inputs (same forward values, gradient truncated at each latent
    input; far cheaper on a GPU).
    grad="bptt:m": the truncated pass, then m more parallel passes, each feeding every slot the output the
    previous pass computed at the position before it. Same forward values; the gradient flows back through m
    feedback links (truncated backprop through time): bptt:0 is "truncated", bptt:K equals "full" exactly
    (K passes rebuild the whole chain), at the cost of m + 1 parallel passes and no sequential step with
    gradients. Works with gradient checkpointing.
    grad="adjoint": the full gradient (equal to "full"), computed without a recurrence with gradients: the
    truncated pass, plus K-1 vector-Jacobian products on a pass over the slots alone, solved in its backward
    (lcot.core.adjoint). Without gradients it is "truncated".
    fast: how a recurrence without gradients runs (grad="truncated", or any call under torch.no_grad):
    None = $LCOT_FAST, else "auto" (a static cache and a CUDA graph of `latent_step` on a CUDA model, the
    dynamic cache otherwise), or "off", "static", "graph" (see lcot.core.graph). With gradients: always the
    dynamic cache.
    answer=False: without gradients, stop after the latent slots (the teacher precompute needs only their outputs):
    hidden then holds columns :s+K, the same values. The recurrence skips its pass over the answer; a parallel pass
    (feed="pause", K=0, "truncated" and "bptt:m" without gradients) still runs over every column, so that its
    values stay bit for bit those of the whole pass.
    """
    if not answer and torch.is_grad_enabled():
        raise ValueError("answer=False stops before the answer, whose loss needs it: use it without gradients")
    links = bptt_links(grad)
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    ids, mask, pos = batch["input_ids"], batch["attention_mask_4d"], batch["position_ids"]
    s, k = batch["latent_start"], batch["num_latents"]
    embeds = embed_inputs(model, ids, batch.get("pixel_values"), batch.get("image_grid_thw"), batch.get("pixel_lut"))
    rows, length = ids.shape
    stop = length if answer else s + k  # causal: no column before s+k reads the answer
    if feed == "pause" or not k:  # nothing fed back: one parallel pass computes everything
        hidden = text_forward(model, embeds, mask, pos, slice(0, length))[:, :stop]
        return hidden, hidden[:, s:s + k]
    adjoint = grad == "adjoint" and torch.is_grad_enabled()
    if grad in ("truncated", "adjoint") or links is not None:
        with chain_mode(model):
            steps = runner(model, rows, length, fast)
            h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
            latent_in, _ = steps.run(h[:, -1:], mask, pos, s, k)
            prefix = prefix_cache(model, steps.cache, s) if adjoint else None
        if adjoint:
            # compiled like the step, where the chain ran it (on a static cache)
            hidden = adjoint_pass(model, embeds, latent_in, prefix, mask, pos, s,
                                  compiled=not isinstance(steps, EagerLatents))
            return hidden, hidden[:, s:s + k]
        hidden = text_forward(model, with_latents(embeds, latent_in, s), mask, pos, slice(0, length))
        for _ in range(links or 0):  # each pass adds one feedback link to the gradient
            hidden = text_forward(model, with_latents(embeds, hidden[:, s - 1:s + k - 1], s), mask, pos,
                                  slice(0, length))
        return hidden[:, :stop], hidden[:, s:s + k]
    if model.training and torch.is_grad_enabled() and checkpointing_on(model):
        raise ValueError("gradient checkpointing drops the KV cache the full-gradient recurrence needs: "
                         "use grad='adjoint' (the same gradient) or 'truncated' with gradient checkpointing")
    steps = runner(model, rows, length, fast)  # the dynamic cache whenever gradients are on
    pre = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
    _, latents = steps.run(pre[:, -1:], mask, pos, s, k)
    if stop == s + k:
        return torch.cat([pre, latents], 1), latents
    post = steps.forward(embeds[:, s + k:], mask, pos, slice(s + k, length))
    return torch.cat([pre, latents, post], 1), latents


class LatentQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that also takes `attention_mask_4d` (B, 1, L, L) and `latent_mode`.

    Loads any Qwen2.5-VL checkpoint with from_pretrained; saved checkpoints load in the stock class.
    """

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attention_mask_4d: torch.Tensor | None = None,
                latent_mode: bool = False, latent_start: int | None = None, num_latents: int = 0,
                grad: GradMode = "full", fast: str | bool | None = None,
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
        batch = {"input_ids": input_ids, "attention_mask_4d": attention_mask_4d, "position_ids": position_ids,
                 "latent_start": latent_start, "num_latents": num_latents, "pixel_values": pixel_values,
                 "image_grid_thw": image_grid_thw, "pixel_lut": pixel_lut}
        hidden, latents = latent_hidden_states(self, batch, grad, fast, feed)
        loss = ce_loss(self.lm_head, hidden, labels, latent_start - 2) if labels is not None else None
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
