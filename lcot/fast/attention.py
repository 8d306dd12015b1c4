"""The language model's attention: transformers' sdpa, except single-token steps of grouped-query attention.

A latent step (and a decoding step) is one query row per record against the whole KV cache, under a mask row.
Given a mask, transformers' sdpa path cannot use sdpa's own grouped-query support, so it first copies every
key-value head once per query head it serves (`repeat_kv`): the cache copied once per query head in every layer
(benchmarks/RESULTS.md, `step_anatomy.py`). `step_sdpa` instead lets the
query heads of one key-value head be the query rows of one attention over that head, under the same mask row:
the same attention, without the copies. Every other call goes to transformers' sdpa unchanged.

Inside a compiled step without gradients (--compile_step) those query rows go to FlexAttention instead of sdpa:
torch.compile makes it a decoding kernel that splits the keys over the GPU's multiprocessors (sdpa's kernel gives
one program to each key-value head of each record; benchmarks/RESULTS.md).

Both are registered through transformers' AttentionInterface (and its mask interface, so 2D masks are built as for
sdpa): STEPS (FlexAttention in compiled steps) and STEPS_SDPA (sdpa's kernel there too);
`use_step_attention(model, flex)` selects one for a model's language model where that uses sdpa.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

STEPS = "lcot_sdpa_steps"
STEPS_SDPA = "lcot_sdpa_steps_no_flex"
FLEX_BLOCK = 128  # keys per block of the FlexAttention mask (its default block size)


def flex_rows(rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """Attention of query rows (B, G, R, D) over keys and values (B, G, S, D) where keep (B, S) is True, by
    FlexAttention: (B, G, R, D). Every block of keys is listed as partly masked, so the mask is read element by
    element and the block mask need not change between steps (a CUDA graph replays it with new mask rows)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, _, r, _ = rows.shape
    s = key.shape[2]
    n = -(-s // FLEX_BLOCK)
    counts = torch.full((b, 1, 1), n, dtype=torch.int32, device=rows.device)
    blocks = torch.arange(n, dtype=torch.int32, device=rows.device).view(1, 1, 1, n).expand(b, 1, 1, n)

    def visible(bi, _h, _q, kv):
        return keep[bi, kv]

    block_mask = BlockMask.from_kv_blocks(counts, blocks, BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible,
                                          seq_lengths=(r, s), compute_q_blocks=False)
    return flex_attention(rows, key, value, block_mask=block_mask, scale=scale)


def step_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None = None, scaling: float | None = None, dropout: float = 0.0,
              flex: bool = True, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: q (B, H, Q, D), k and v (B, Hkv, S, D) -> (B, Q, H, D).
    For Q == 1, Hkv < H and a mask row shared by the heads (B, 1, 1, S): the H/Hkv query heads of each key-value
    head as query rows of one attention (with `flex`, FlexAttention in a compiled step without gradients under a bool
    mask, see the module's docstring; sdpa otherwise); every other call: transformers' sdpa."""
    b, heads, q, d = query.shape
    groups = key.shape[1]
    if (q != 1 or groups == heads or attention_mask is None or attention_mask.shape[1:3] != (1, 1)
            or (dropout and module.training)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = query.reshape(b, groups, heads // groups, d)  # head i serves key-value head i // (H/Hkv), as repeat_kv
    # FlexAttention's block mask here has no query blocks, so no backward: passes with gradients (the adjoint's pass
    # over a single slot, K=2) keep sdpa
    if (torch.compiler.is_compiling() and not torch.is_grad_enabled() and attention_mask.dtype == torch.bool
            and flex and query.dtype == key.dtype == value.dtype):
        out = flex_rows(rows, key, value, attention_mask[:, 0, 0], scaling)
    else:
        out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, heads, d), None


AttentionInterface.register(STEPS, step_sdpa)
AttentionInterface.register(STEPS_SDPA, partial(step_sdpa, flex=False))
AttentionMaskInterface.register(STEPS, sdpa_mask)
AttentionMaskInterface.register(STEPS_SDPA, sdpa_mask)


def set_text_attention(model, name: str) -> str:
    """Set the attention implementation of `model`'s language model (both configs that name it); returns the
    previous one."""
    text = model.config.text_config
    old = text._attn_implementation
    for cfg in {id(c): c for c in (text, model.model.language_model.config)}.values():
        cfg._attn_implementation = name
    return old


def use_step_attention(model, flex: bool = True) -> bool:
    """Select step_sdpa (STEPS, or STEPS_SDPA without FlexAttention) for the language model of `model` where it uses
    sdpa (not eager, not flash); True if so."""
    if model.config.text_config._attn_implementation not in ("sdpa", STEPS, STEPS_SDPA):
        return False
    set_text_attention(model, STEPS if flex else STEPS_SDPA)
    return True
