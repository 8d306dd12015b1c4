"""The one 4D attention-mask builder, from per-token segment labels.

Rule: causal; thought-image tokens are visible only to latent slots (and, causally, to themselves);
padding is invisible; everything else is plain causal. The visual-CoT rule (`visual_cot=True`, the
from-scratch warm-up and the upper bound) lets every later token see the thought images, the answer too.
A padding query row attends to itself only, so no row is empty (an empty row gives NaN with eager attention).

Which thought image a latent slot sees (`visibility`, from the collator's `steps`: image t's tokens carry t,
latent slot j carries j, counted from 1): "all" (every one), "stepwise" (slot j sees image j only, slots past
the last image the last one) or "cumulative" (images 1..j). A thought image's own tokens follow the same rule
(under "stepwise" image t does not read images before it), so slot j's view holds nothing of a later step.
With `visual_cot` and a visibility other than "all", the answer after the slots sees every thought image but
`<abs_vis_token>`, whose output is slot 1's input, sees none: otherwise slot 1 would start from all of them.
"""

from __future__ import annotations

from enum import IntEnum

import torch


class Seg(IntEnum):
    """Segment label of each token; the collator writes them, the mask and the figures read them."""

    PAD = 0
    PROMPT = 1  # system/user text and the assistant header
    QUESTION_IMAGE = 2  # <|vision_start|>, image pads and <|vision_end|> of a question image
    THOUGHT_IMAGE = 3  # the same for a thought image (start of the assistant turn)
    LATENT = 4  # the K <abs_vis_token_pad> slots
    ANSWER = 5  # <abs_vis_token>, </abs_vis_token>, "\n", the answer and <|im_end|>


SEGMENT_NAMES = {s: s.name.lower().replace("_", " ") for s in Seg}


VISIBILITY = ("all", "stepwise", "cumulative")


def build_mask(segments: torch.Tensor, visual_cot: bool = False, steps: torch.Tensor | None = None,
               visibility: str = "all") -> torch.Tensor:
    """(B, L) segment labels -> (B, 1, L, L) bool mask, True = query (row) may attend key (column).
    `steps` (B, L): the step of each thought-image token and latent slot (see the module docstring); needed
    unless visibility is "all"."""
    if visibility not in VISIBILITY:
        raise ValueError(f"visibility must be one of {VISIBILITY}, got {visibility!r}")
    _, length = segments.shape
    idx = torch.arange(length, device=segments.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    q, k = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    stepped = (q == Seg.LATENT) | (q == Seg.THOUGHT_IMAGE)
    readers = stepped | visual_cot
    if visibility != "all":
        if steps is None:
            raise ValueError(f"visibility {visibility!r} needs the collator's steps")
        qs, ks = steps[:, :, None], steps[:, None, :]
        if visibility == "stepwise":
            last = torch.where(segments == Seg.THOUGHT_IMAGE, steps, 0).amax(1)[:, None, None]  # images per row
            seen = ks == torch.minimum(qs, last)
        else:
            seen = ks <= qs
        is_latent = segments == Seg.LATENT
        first = torch.where(is_latent.any(1), is_latent.float().argmax(1), length)  # each row's first slot
        after = (idx[None, :] >= first[:, None])[:, :, None]  # query rows from the slots on
        readers = (stepped & seen) | (visual_cot & ~stepped & after)
    key_ok = (k != Seg.PAD) & ((k != Seg.THOUGHT_IMAGE) | readers)
    allowed = (causal & key_ok) | torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 = attend, finfo.min = blocked) for eager attention."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
