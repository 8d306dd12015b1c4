"""Qwen2.5-VL with a 4D attention mask and latent mode, by subclassing (transformers' file is not copied).

Latent mode: the input at latent slot j is the last-layer, final-norm hidden state of position j-1
(the continuous thought is fed back). It runs with a KV cache: the prefix through <abs_vis_token>
once (images included), then K single-token steps (lcot.core.latent), then the rest of the sequence in one pass.
How the passes run (eager, or lcot.fast's static cache and CUDA graphs) is the model's runner's business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import ModelOutput

from lcot.core.collate import decode_pixels
from lcot.core.latent import (
    Passes,
    attn_mask,
    checkpointing_on,
    embed_inputs,
    passes_of,
    with_latents,
)
from lcot.core.loss import ce_loss

GradMode = str  # "full", "adjoint", "truncated" or "bptt:m" (see latent_hidden_states)
FeedMode = Literal["continuous", "pause"]
FEEDS = ("continuous", "pause")
BATCH_KEYS = ("input_ids", "attention_mask_4d", "position_ids", "latent_start", "num_latents", "pixel_values",
              "image_grid_thw", "pixel_lut", "forced_inputs", "forced")  # what latent mode reads from a batch


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


def latent_hidden_states(model, batch: Mapping, grad: GradMode = "full", feed: FeedMode = "continuous",
                         answer: bool = True, runner: Passes | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    grad="adjoint": the full gradient (equal to "full"), computed by the runner without a recurrence with
    gradients (lcot.fast.adjoint); a runner without it (the reference) computes it as "full". Without gradients it
    is "truncated".
    answer=False: without gradients, stop after the latent slots (the teacher precompute needs only their outputs):
    hidden then holds columns :s+K, the same values. The recurrence skips its pass over the answer; a parallel pass
    (feed="pause", K=0, "truncated" and "bptt:m" without gradients) still runs over every column, so that its
    values stay bit for bit those of the whole pass.
    runner: how the passes run (default: the model's, `passes_of`).
    batch["forced_inputs"] (B, K, H) and batch["forced"] (B, K) bool, if given: teacher forcing; slot j's input is
    forced_inputs[:, j] where forced (else the fed-back output). The parallel passes read the inputs, so it needs
    grad="truncated" (unforced slots keep the inputs of the unforced chain) or "bptt:m" (each of the m links feeds
    back the forced chain's outputs).
    """
    if not answer and torch.is_grad_enabled():
        raise ValueError("answer=False stops before the answer, whose loss needs it: use it without gradients")
    links = bptt_links(grad)
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    passes = runner or passes_of(model)
    ids, mask, pos = batch["input_ids"], batch["attention_mask_4d"], batch["position_ids"]
    s, k = batch["latent_start"], batch["num_latents"]
    embeds = embed_inputs(model, ids, batch.get("pixel_values"), batch.get("image_grid_thw"), batch.get("pixel_lut"),
                          passes.vision(model))
    rows, length = ids.shape
    stop = length if answer else s + k  # causal: no column before s+k reads the answer
    if feed == "pause" or not k:  # nothing fed back: one parallel pass computes everything
        hidden = passes.parallel(model, embeds, mask, pos)[:, :stop]
        return hidden, hidden[:, s:s + k]
    forced = batch.get("forced")
    if forced is not None and (grad not in ("truncated",) and links is None or feed == "pause"):
        raise ValueError("teacher forcing (forced latent inputs) needs feed='continuous' and grad='truncated' or "
                         f"'bptt:m', got grad={grad!r}, feed={feed!r}")

    def force(inputs: torch.Tensor) -> torch.Tensor:
        if forced is None:
            return inputs
        return torch.where(forced[..., None].to(inputs.device), batch["forced_inputs"].to(inputs), inputs)

    if grad == "adjoint" and passes.adjoint is None:
        grad = "full"  # the same gradient, by the recurrence with gradients
    adjoint = grad == "adjoint" and torch.is_grad_enabled()
    if grad in ("truncated", "adjoint") or links is not None:
        with passes.chain(model):
            steps = passes.recurrence(model, rows, length)
            h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
            latent_in, _ = steps.run(h[:, -1:], mask, pos, s, k)
        if adjoint:
            hidden = passes.adjoint(model, embeds, latent_in, steps, mask, pos, s)
            return hidden, hidden[:, s:s + k]
        hidden = passes.parallel(model, with_latents(embeds, force(latent_in), s), mask, pos)
        for _ in range(links or 0):  # each pass adds one feedback link to the gradient
            hidden = passes.parallel(model, with_latents(embeds, force(hidden[:, s - 1:s + k - 1]), s), mask, pos)
        return hidden[:, :stop], hidden[:, s:s + k]
    if model.training and torch.is_grad_enabled() and checkpointing_on(model):
        raise ValueError("gradient checkpointing drops the KV cache the full-gradient recurrence needs: "
                         "use grad='adjoint' (the same gradient, with lcot.fast) or 'truncated' with gradient "
                         "checkpointing")
    steps = passes.recurrence(model, rows, length)  # the dynamic cache whenever gradients are on
    pre = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
    _, latents = steps.run(pre[:, -1:], mask, pos, s, k)
    if stop == s + k:
        return torch.cat([pre, latents], 1), latents
    post = steps.forward(embeds[:, s + k:], mask, pos, slice(s + k, length))
    return torch.cat([pre, latents, post], 1), latents


class LatentQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that also takes `attention_mask_4d` (B, 1, L, L) and `latent_mode`.

    Loads any Qwen2.5-VL checkpoint with from_pretrained; saved checkpoints load in the stock class.
    `lcot_runner` (None: the reference passes) is the runner lcot.fast.Runner.attach gives it.
    """

    lcot_runner: Passes | None = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, attention_mask_4d: torch.Tensor | None = None,
                latent_mode: bool = False, latent_start: int | None = None, num_latents: int = 0,
                grad: GradMode = "full", feed: FeedMode = "continuous",
                runner: Passes | None = None, pixel_lut: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, forced_inputs: torch.Tensor | None = None,
                forced: torch.Tensor | None = None, **kwargs):
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
                 "image_grid_thw": image_grid_thw, "pixel_lut": pixel_lut,
                 **({"forced_inputs": forced_inputs, "forced": forced} if forced is not None else {})}
        hidden, latents = latent_hidden_states(self, batch, grad, feed, runner=runner)
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
