"""Display grouping of a batch's tokens for the figures, the viewer and the access table.

The mask's segment labels (`lcot.core.mask.Seg`) put `<abs_vis_token>` and `</abs_vis_token>` in the
answer segment (they are labelled, i.e. CE targets, like the answer). Shown that way, a table reads
"latent -> answer 1.00", as if the latents saw the answer: they only see `<abs_vis_token>`, the
opening delimiter. For display, the two delimiters get a part of their own, "latent markers". The
mask itself is untouched: only the names and colours drawn differ.
"""

from __future__ import annotations

import torch

from lcot.core.mask import SEGMENT_NAMES, Seg

MARKER = len(Seg)  # display part of <abs_vis_token> and </abs_vis_token> (a value no Seg has)
PARTS: tuple[int, ...] = (Seg.PAD, Seg.PROMPT, Seg.QUESTION_IMAGE, Seg.THOUGHT_IMAGE, MARKER, Seg.LATENT,
                          Seg.ANSWER)  # in the order they appear in a sequence
PART_NAMES: dict[int, str] = {**{int(s): SEGMENT_NAMES[s] for s in Seg}, MARKER: "latent markers"}


def display_segments(batch: dict) -> torch.Tensor:
    """(B, L) display parts: the batch's segments with the two latent delimiters relabelled `MARKER`.

    The collator aligns the latent slots of every row: `<abs_vis_token>` sits at column latent_start - 1
    and `</abs_vis_token>` at latent_start + num_latents (K = 0 included), in every row.
    """
    parts = batch["segments"].clone()
    start, k = int(batch["latent_start"]), int(batch["num_latents"])
    for col in (start - 1, start + k):
        if 0 <= col < parts.shape[1]:
            parts[:, col] = torch.where(parts[:, col] == Seg.ANSWER, MARKER, parts[:, col])
    return parts


def part_name(value: int) -> str:
    return PART_NAMES[int(value)]
