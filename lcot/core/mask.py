"""The one 4D attention-mask builder, from per-token segment labels.

Rule: causal; thought-image tokens are visible only to latent slots (and, causally, to themselves);
padding is invisible; everything else is plain causal. The visual-CoT rule (`visual_cot=True`, the
from-scratch warm-up and the upper bound) lets every later token see the thought images, the answer too.
A padding query row attends to itself only, so no row is empty (an empty row gives NaN with eager attention).
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


def build_mask(segments: torch.Tensor, visual_cot: bool = False) -> torch.Tensor:
    """(B, L) segment labels -> (B, 1, L, L) bool mask, True = query (row) may attend key (column)."""
    _, length = segments.shape
    idx = torch.arange(length, device=segments.device)
    causal = idx[None, :] <= idx[:, None]  # (L, L)
    q, k = segments[:, :, None], segments[:, None, :]  # (B, L, 1), (B, 1, L)
    readers = (q == Seg.LATENT) | (q == Seg.THOUGHT_IMAGE) | visual_cot
    key_ok = (k != Seg.PAD) & ((k != Seg.THOUGHT_IMAGE) | readers)
    allowed = (causal & key_ok) | torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 = attend, finfo.min = blocked) for eager attention."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
