"""Losses: CE over the labelled tokens, plus alignment of the latents to the teacher's first K."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lcot.core.checks import check
from lcot.core.tokens import IGNORE

AlignKind = Literal["cosine", "mse", "centered"]
ALIGNS = ("cosine", "mse", "centered")


def ce_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Next-token CE, averaged over the labelled tokens.

    No label may come before column start + 1: logits are computed from column `start` on only, saving memory
    (the collator's batches label nothing before the <abs_vis_token> at latent_start - 1, so start =
    latent_start - 2). Selecting just the labelled positions would read their count back to the host (a GPU
    stall every step); the slice and ignore_index do not.
    """
    start = max(start, 0)
    check((labels[:, :start + 1] == IGNORE).all(), f"labels before column {start + 1}: ce_loss was given start="
          f"{start}, but the labelled tokens begin earlier")
    logits = lm_head(hidden[:, start:-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), labels[:, start + 1:].flatten(), ignore_index=IGNORE)


def per_position_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, K, H) x (B, K, H) -> (B, K): cosine along the hidden dimension (dim=-1, not the token axis)."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1)


def centred_cosines(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cosine (K,) after subtracting `center` (K', H) from both, against the record's own teacher and
    against another record's (the batch's teachers rolled by one row; NaN for a batch of one record). Own minus
    shuffled is what the latents hold of their own record: near 0 when they hold nothing record-specific."""
    k = student.shape[1]
    c = center[:k].to(student.device).float()
    s, t = student.detach().float() - c, teacher[:, :k].to(student.device).float() - c
    own = per_position_cosine(s, t).mean(0)
    other = per_position_cosine(s, t.roll(1, 0)).mean(0) if len(t) > 1 else torch.full_like(own, float("nan"))
    return own, other


def state_loss(lm_head: torch.nn.Module, latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-step supervision: CE of each latent slot's next-token logits (B, K, V) against the first token of the
    state after its step, targets (B, >= K) (IGNORE where a record has no state)."""
    logits = lm_head(latents).float()
    return F.cross_entropy(logits.flatten(0, 1), targets[:, :latents.shape[1]].to(logits.device).flatten(),
                           ignore_index=IGNORE)


def align_loss(student: torch.Tensor, teacher: torch.Tensor, kind: AlignKind = "cosine",
               center: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Alignment of student latents to teacher[:, :K]; returns (loss, per-position cosine (K,), detached).

    cosine: mean over batch and positions of 1 - cos. mse: mean squared error over all elements.
    centered: 1 - cos after subtracting `center` (the teacher's mean latent per position over the training
    records, (K', H)) from both. Latents share a large record-independent direction (on a model trained from
    scratch, 98% of their norm), so a plain cosine is near 1 whatever the record-specific part does; centring
    aligns what differs between records.
    """
    k = student.shape[1]
    if teacher.shape[1] < k:
        raise ValueError(f"the teacher holds {teacher.shape[1]} latents, fewer than K={k}")
    teacher = teacher[:, :k].to(student.device)
    cos = per_position_cosine(student, teacher)
    if kind == "cosine":
        loss = (1 - cos).mean()
    elif kind == "mse":
        loss = F.mse_loss(student.float(), teacher.float())
    elif kind == "centered":
        if center is None:
            raise ValueError("centered alignment needs the teacher's mean latent (center)")
        c = center[:k].to(student.device).float()
        loss = (1 - per_position_cosine(student.float() - c, teacher.float() - c)).mean()
    else:
        raise ValueError(f"alignment must be one of {ALIGNS}, got {kind!r}")
    return loss, cos.detach().mean(0)
