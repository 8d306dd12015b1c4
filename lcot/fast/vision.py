"""The vision tower without per-image Python loops: the same numbers, a constant number of launches.

With sdpa, transformers' Qwen2.5-VL vision tower computes rotary positions and window indices image by
image and runs attention chunk by chunk (one SDPA per image and per window), about 230 tensor ops per
image and layer stack: a batch of 32 hops records (160 small images) issues ~37,000 ops a step, which
starves a GPU when the model is small. Two of transformers' own extension points remove the loops:

* `vision_kwargs`: the tensors `transformers.vision_utils` documents as precomputable (`position_ids`,
  `cu_seqlens`, `window_index`, `cu_window_seqlens` and their maxima), built by transformers' own
  functions once per image grid and assembled per batch with offsets;
* `packed_sdpa`: an attention function registered under `PACKED` and selected for the vision tower only.
  transformers hands `cu_seqlens` only to implementations whose name contains "flash" (the varlen
  path), hence the name. Segments of one length (every window, and every image of one size) go through
  one batched SDPA; segments of other lengths are grouped by length, so the result equals per-chunk SDPA.
The runner uses both unless built with vision=False (transformers' own path, for reference and timing).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

PACKED = "lcot_packed_flash_sdpa"


def _segments(x: torch.Tensor, cols: torch.Tensor | None, n: int, length: int) -> torch.Tensor:
    """(1, heads, T, dim) -> (n, heads, length, dim): n segments of one length (all of T when cols is None)."""
    x = x[0] if cols is None else x[0][:, cols]
    return x.reshape(x.shape[0], n, length, x.shape[-1]).transpose(0, 1)


def packed_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                scaling: float | None = None, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                max_length_q: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Block-diagonal (per segment) non-causal attention of packed sequences. q, k, v: (1, heads, T, dim);
    returns (1, T, heads, dim) as transformers' attention functions do."""
    _, heads, total, dim = query.shape
    n = cu_seq_lens_q.numel() - 1
    if max_length_q and n * max_length_q == total:  # all segments of one length: known without a device sync
        lengths = [max_length_q] * n
    else:
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    p = dropout if module.training else 0.0
    if len(set(lengths)) == 1:  # one batched SDPA, reshapes only
        o = F.scaled_dot_product_attention(*(_segments(x, None, n, lengths[0]) for x in (query, key, value)),
                                           scale=scaling, dropout_p=p)
        return o.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None
    out = query.new_empty(1, total, heads, dim)
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for length in sorted(set(lengths)):  # one batched SDPA per segment length
        idx = [i for i, m in enumerate(lengths) if m == length]
        cols = torch.cat([torch.arange(starts[i], starts[i] + length) for i in idx]).to(query.device)
        o = F.scaled_dot_product_attention(*(_segments(x, cols, len(idx), length) for x in (query, key, value)),
                                           scale=scaling, dropout_p=p)
        out[0, cols] = o.permute(0, 2, 1, 3).reshape(len(idx) * length, heads, dim)
    return out, None


AttentionInterface.register(PACKED, packed_sdpa)


@lru_cache(maxsize=64)
def _one_image(grid: tuple[int, int, int], merge: int, window: int, patch: int) -> tuple:
    """transformers' own per-image tensors for one grid (CPU): positions, window index, window seqlens."""
    g = torch.tensor([grid])
    pos = get_vision_position_ids(g, merge)
    index, cu_window = get_vision_window_index(g, merge, window, patch)
    return pos, index, cu_window[1:]  # the window ends (the leading 0 added once per batch)


def vision_kwargs(grid_thw: torch.Tensor, vision_config, device: torch.device) -> dict:
    """The precomputable vision-tower inputs of a batch of images, equal to what the tower computes itself.

    Pass `grid_thw` on the CPU where you can (the trainer does): reading it from a GPU is a device sync.
    """
    merge, window, patch = vision_config.spatial_merge_size, vision_config.window_size, vision_config.patch_size
    grids = tuple(tuple(int(v) for v in g) for g in grid_thw.tolist())
    cpu = _batch_kwargs(grids, merge, window, patch)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in cpu.items()}


@lru_cache(maxsize=64)
def _batch_kwargs(grids: tuple[tuple[int, int, int], ...], merge: int, window: int, patch: int) -> dict:
    """vision_kwargs on the CPU, for one tuple of grids (batches of equal-sized images repeat it), built
    with a constant number of ops: each image's tensors plus its offset, added in one go."""
    parts = [_one_image(g, merge, window, patch) for g in grids]
    merged = torch.tensor([t * (h // merge) * (w // merge) for t, h, w in grids])
    patches = torch.tensor([t * h * w for t, h, w in grids])
    index = torch.cat([p[1] for p in parts])
    index = index + torch.repeat_interleave(merged.cumsum(0) - merged, torch.tensor([len(p[1]) for p in parts]))
    bounds = torch.cat([p[2] for p in parts])
    bounds = bounds + torch.repeat_interleave(patches.cumsum(0) - patches, torch.tensor([len(p[2]) for p in parts]))
    cu_window = torch.unique_consecutive(torch.cat([torch.zeros(1, dtype=bounds.dtype), bounds]).to(torch.int32))
    cu = get_vision_cu_seqlens(torch.tensor(grids))
    return {"position_ids": torch.cat([p[0] for p in parts]), "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()), "window_index": index, "cu_window_seqlens": cu_window,
            "max_window_seqlen": int((cu_window[1:] - cu_window[:-1]).max())}


def use_packed_attention(model) -> None:
    """Select the packed attention for the vision tower of `model` (the language model keeps its own)."""
    model.config.vision_config._attn_implementation = PACKED
    model.model.visual.config._attn_implementation = PACKED
