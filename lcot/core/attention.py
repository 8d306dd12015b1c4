"""The language model's attention: transformers' sdpa, except single-token steps of grouped-query attention.

A latent step (and a decoding step) is one query row per record against the whole KV cache, under a mask row.
Given a mask, transformers' sdpa path cannot use sdpa's own grouped-query support, so it first copies every
key-value head once per query head it serves (`repeat_kv`): at 3B, 0.47 ms of a 4.7 ms compiled step, the
cache copied 8 times in every layer (benchmarks/RESULTS.md, `step_anatomy.py`). `step_sdpa` instead lets the
query heads of one key-value head be the query rows of one attention over that head, under the same mask row:
the same attention, without the copies. Every other call goes to transformers' sdpa unchanged.

Inside a compiled step (--compile_step) those query rows go to FlexAttention instead of sdpa: torch.compile makes
it a decoding kernel that splits the keys over the GPU's multiprocessors. sdpa's kernel gives one program to each
key-value head of each record (4 programs at 3B, batch 2): 0.84 ms of a 4.6 ms step (benchmarks/RESULTS.md).

Multi-token passes on a GPU under lcot's 4D bool mask (training's pass with gradients, the prefix, the teacher's
forward) go to compiled FlexAttention (`flex_pass`), with a block mask made once per mask tensor from the mask
itself: blocks of keys a block of queries cannot see are skipped, blocks it sees whole are not masked element by
element. sdpa with a dense mask cannot use its flash kernel. LCOT_PASS_ATTENTION=sdpa keeps sdpa for them. On a
CPU FlexAttention has no backward: sdpa there.

It is registered through transformers' AttentionInterface (and its mask interface, so 2D masks are built as for
sdpa) under STEPS, and `use_step_attention` selects it for a model's language model where that uses sdpa.
LCOT_STEP_ATTENTION (read when a model loads, and when its step compiles): "steps" (the default) as above;
"sdpa": sdpa's kernel in compiled steps too; "stock": transformers' path.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

STEPS = "lcot_sdpa_steps"
ENV = "LCOT_STEP_ATTENTION"  # "steps" (default), "sdpa" (no FlexAttention), "stock" (transformers' sdpa throughout)
MODES = ("steps", "sdpa", "stock")
FLEX_BLOCK = 128  # keys per block of the FlexAttention mask (its default block size)
PASS_ENV = "LCOT_PASS_ATTENTION"  # "flex" (default) or "sdpa": multi-token passes on a GPU under a 4D bool mask
_BLOCK_MASKS: list[tuple[weakref.ref, object]] = []  # the block masks of the last two mask tensors
_COMPILED_FLEX: list = []  # torch.compile(flex_attention), made at the first pass that takes it


def mode() -> str:
    value = os.environ.get(ENV, "steps")
    if value not in MODES:
        raise ValueError(f"${ENV} must be one of {MODES}, got {value!r}")
    return value


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


def pass_mode() -> str:
    value = os.environ.get(PASS_ENV, "flex")
    if value not in ("flex", "sdpa"):
        raise ValueError(f"${PASS_ENV} must be 'flex' or 'sdpa', got {value!r}")
    return value


def block_mask_of(mask: torch.Tensor):
    """The FlexAttention block mask of a (B, 1, Q, S) bool mask, made once per mask tensor: every layer of a pass
    (and a checkpointed layer's recomputation) gets the same tensor."""
    from torch.nn.attention.flex_attention import create_block_mask

    for ref, block_mask in _BLOCK_MASKS:
        if ref() is mask:
            return block_mask
    b, _, q, s = mask.shape
    dense = mask[:, 0]

    def visible(bi, _h, qi, kv):
        return dense[bi, qi, kv]

    block_mask = create_block_mask(visible, b, None, q, s, device=mask.device, BLOCK_SIZE=FLEX_BLOCK)
    _BLOCK_MASKS[:] = [(weakref.ref(mask), block_mask), *_BLOCK_MASKS[:1]]
    return block_mask


def flex_pass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
              scale: float | None = None, compiled: bool = True) -> torch.Tensor:
    """Attention of q (B, H, Q, D) over k and v (B, Hkv, S, D) under a (B, 1, Q, S) bool mask by FlexAttention
    (compiled: its fused kernels; else its reference form, for CPU tests): (B, Q, H, D). Under CUDA autocast the
    three are cast to its dtype first, as autocast casts sdpa's inputs."""
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)

    if compiled and not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention))
    fn = _COMPILED_FLEX[0] if compiled else flex_attention
    out = fn(query, key, value, block_mask=block_mask_of(mask), scale=scale,
             enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous()


def _takes_flex_pass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     dropout: float) -> bool:
    """A multi-token pass on a GPU under a 4D bool mask, outside torch.compile and CUDA graph capture."""
    return (query.is_cuda and query.shape[2] > 1 and mask is not None and mask.dtype == torch.bool
            and mask.dim() == 4 and mask.shape[1] == 1 and not dropout
            and (query.dtype == key.dtype == value.dtype or torch.is_autocast_enabled("cuda"))
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
            and pass_mode() == "flex")


def step_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None = None, scaling: float | None = None, dropout: float = 0.0,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: q (B, H, Q, D), k and v (B, Hkv, S, D) -> (B, Q, H, D).
    A multi-token pass on a GPU under a 4D bool mask: `flex_pass`. For Q == 1, Hkv < H and a mask row shared by the heads (B, 1, 1, S): the H/Hkv query heads of each key-value
    head as query rows of one attention (FlexAttention in a compiled step with a bool mask, see the module's
    docstring; sdpa otherwise); every other call: transformers' sdpa."""
    b, heads, q, d = query.shape
    groups = key.shape[1]
    if _takes_flex_pass(query, key, value, attention_mask, dropout if module.training else 0.0):
        return flex_pass(query, key, value, attention_mask, scaling), None
    if (q != 1 or groups == heads or attention_mask is None or attention_mask.shape[1:3] != (1, 1)
            or (dropout and module.training)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = query.reshape(b, groups, heads // groups, d)  # head i serves key-value head i // (H/Hkv), as repeat_kv
    if (torch.compiler.is_compiling() and attention_mask.dtype == torch.bool and mode() == "steps"
            and query.dtype == key.dtype == value.dtype):
        out = flex_rows(rows, key, value, attention_mask[:, 0, 0], scaling)
    else:
        out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, 1, heads, d), None


AttentionInterface.register(STEPS, step_sdpa)
AttentionMaskInterface.register(STEPS, sdpa_mask)


def enabled() -> bool:
    return mode() != "stock"


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
    pass_mode()  # a wrong $LCOT_PASS_ATTENTION fails at load, not in the first pass
    if not enabled() or model.config.text_config._attn_implementation != "sdpa":
        return False
    set_text_attention(model, STEPS)
    return True
