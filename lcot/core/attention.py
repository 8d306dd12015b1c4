"""The language model's attention: transformers' sdpa, except single-token steps of grouped-query attention.

A latent step (and a decoding step) is one query row per record against the whole KV cache, under a mask row.
Given a mask, transformers' sdpa path cannot use sdpa's own grouped-query support, so it first copies every
key-value head once per query head it serves (`repeat_kv`): at 3B, 0.47 ms of a 4.7 ms compiled step, the
cache copied 8 times in every layer (benchmarks/RESULTS.md, `step_anatomy.py`). `step_sdpa` instead lets the
query heads of one key-value head be the query rows of one attention over that head, under the same mask row:
the same attention, without the copies. Every other call goes to transformers' sdpa unchanged.

It is registered through transformers' AttentionInterface (and its mask interface, so 2D masks are built as for
sdpa) under STEPS, and `use_step_attention` selects it for a model's language model where that uses sdpa.
LCOT_STEP_ATTENTION=stock keeps transformers' path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

STEPS = "lcot_sdpa_steps"
ENV = "LCOT_STEP_ATTENTION"  # "stock": transformers' sdpa for every call


def step_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None = None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: q (B, H, Q, D), k and v (B, Hkv, S, D) -> (B, Q, H, D).
    For Q == 1, Hkv < H and a mask row shared by the heads (B, 1, 1, S): the H/Hkv query heads of each key-value
    head as query rows of one attention; otherwise transformers' sdpa."""
    b, heads, q, d = query.shape
    groups = key.shape[1]
    if (q != 1 or groups == heads or attention_mask is None or attention_mask.shape[1:3] != (1, 1)
            or (dropout and module.training)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = query.reshape(b, groups, heads // groups, d)  # head i serves key-value head i // (H/Hkv), as repeat_kv
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, heads, d), None


AttentionInterface.register(STEPS, step_sdpa)
AttentionMaskInterface.register(STEPS, sdpa_mask)


def enabled() -> bool:
    mode = os.environ.get(ENV, "steps")
    if mode not in ("steps", "stock"):
        raise ValueError(f"${ENV} must be 'steps' or 'stock', got {mode!r}")
    return mode == "steps"


def set_text_attention(model, name: str) -> str:
    """Set the attention implementation of `model`'s language model (both configs that name it); returns the
    previous one."""
    text = model.config.text_config
    old = text._attn_implementation
    for cfg in {id(c): c for c in (text, model.model.language_model.config)}.values():
        cfg._attn_implementation = name
    return old


def use_step_attention(model) -> bool:
    """Select step_sdpa for the language model of `model` where it uses sdpa (not eager, not flash); True if so."""
    if not enabled() or model.config.text_config._attn_implementation != "sdpa":
        return False
    set_text_attention(model, STEPS)
    return True
