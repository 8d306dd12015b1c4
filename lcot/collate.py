"""The one collator: records -> a batch with everything a latent forward needs.

Sequence of one record (Qwen2.5-VL chat template):

    <|im_start|>system ... <|im_end|> <|im_start|>user [question images] question <|im_end|>
    <|im_start|>assistant\\n [thought images] <abs_vis_token> K x <abs_vis_token_pad> </abs_vis_token>
        \\n answer <|im_end|>

Batches are padded so that the latent slots sit in the same columns for every row: the prefix
(through <abs_vis_token>) is left-padded, the suffix right-padded. The K single-token latent steps
then run for the whole batch at once.

Position invariance: every token that is not part of a thought image gets the M-RoPE position it
would get if the thought images were absent (positions are computed on the sequence without them).
The thought images themselves are laid out where the first of them starts in the full sequence,
i.e. at the position <abs_vis_token> has, overlapping the latent positions. The teacher (thought
images shown) and the student (stage3, inference) thus compute their latents at the very same
positions, and stage2's answer tokens see the same positions as at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from lcot.data import Record, load_image
from lcot.mask import Seg, build_mask
from lcot.tokens import TokenIds

IGNORE = -100


class RopeIndex:
    """transformers' own Qwen2.5-VL get_rope_index, usable without building the model."""

    def __init__(self, config) -> None:
        self._model = SimpleNamespace(config=config)
        self._model.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(
            self._model, *a, **k)

    def __call__(self, input_ids, mm_token_type_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        pos, _ = Qwen2_5_VLModel.get_rope_index(self._model, input_ids, mm_token_type_ids,
                                                image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        return pos


class Collator:
    """Build batches for one setting: K latent slots, with or without question/thought images.

    with_answer=False builds a generation prompt instead: the prefix, K slots, </abs_vis_token> and
    `reserve` answer columns to be filled by decoding (their mask rows and positions are ready).
    """

    def __init__(self, processor, config, num_latents: int, thought_images: bool,
                 question_images: bool = True, with_answer: bool = True, reserve: int = 0) -> None:
        if num_latents < 0:
            raise ValueError(f"num_latents must be >= 0, got {num_latents}")
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.ids = TokenIds.from_tokenizer(self.tokenizer)
        self.k, self.thought_images, self.question_images = num_latents, thought_images, question_images
        self.with_answer, self.reserve = with_answer, reserve
        self.merge = config.vision_config.spatial_merge_size
        self.rope = RopeIndex(config)

    # -- one record -> token pieces -------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _image_tokens(self, grid: torch.Tensor, seg: Seg) -> tuple[list[int], list[int]]:
        n = int(grid.prod()) // self.merge**2
        ids = [self.ids.vision_start] + [self.ids.image_pad] * n + [self.ids.vision_end]
        return ids, [seg] * len(ids)

    def _record(self, rec: Record, grids: list[torch.Tensor]) -> tuple[list[int], list[int], list[int], list[int]]:
        """-> (prefix ids, prefix segments, suffix ids, suffix segments); prefix ends with <abs_vis_token>."""
        nq = len(rec.question_images) if self.question_images else 0
        content = [{"type": "image"}] * nq + [{"type": "text", "text": rec.question}]
        prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        ids, segs = [], []
        grid_iter = iter(grids)
        for tok in self._encode(prompt):
            if tok == self.ids.image_pad:  # expand the placeholder; <|vision_start|> before it is image too
                n = int(next(grid_iter).prod()) // self.merge**2
                segs[-1] = Seg.QUESTION_IMAGE
                ids += [tok] * n
                segs += [Seg.QUESTION_IMAGE] * n
            else:
                ids.append(tok)
                segs.append(Seg.QUESTION_IMAGE if tok == self.ids.vision_end else Seg.PROMPT)
        for grid in grid_iter:  # thought images: the start of the assistant turn
            im_ids, im_segs = self._image_tokens(grid, Seg.THOUGHT_IMAGE)
            ids += im_ids
            segs += im_segs
        ids.append(self.ids.latent_start)
        segs.append(Seg.ANSWER)
        suffix = [self.ids.latent_pad] * self.k + [self.ids.latent_end]
        if self.with_answer:
            suffix += self._encode("\n" + rec.final_answer) + [self.ids.im_end]
        else:
            suffix += [self.ids.pad] * self.reserve
        return ids, segs, suffix, [Seg.LATENT] * self.k + [Seg.ANSWER] * (len(suffix) - self.k)

    def _images(self, records: Sequence[Record]) -> tuple[list, list[bool]]:
        images, is_thought = [], []
        for rec in records:
            paths = (list(rec.question_images) if self.question_images else [])
            flags = [False] * len(paths)
            if self.thought_images:
                paths += list(rec.thought_images)
                flags += [True] * len(rec.thought_images)
            images += [load_image(p) for p in paths]
            is_thought += flags
        return images, is_thought

    # -- batch ------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Record]) -> dict:
        images, is_thought = self._images(records)
        pixel_values = grid_thw = None
        if images:
            out = self.processor.image_processor(images=images, return_tensors="pt")
            pixel_values, grid_thw = out["pixel_values"], out["image_grid_thw"]
        grids = list(grid_thw) if grid_thw is not None else []
        pieces, start = [], 0
        for rec in records:
            n = (len(rec.question_images) if self.question_images else 0) + (
                len(rec.thought_images) if self.thought_images else 0)
            pieces.append(self._record(rec, grids[start:start + n]))
            start += n
        n_pre = max(len(p[0]) for p in pieces)
        n_suf = max(len(p[2]) for p in pieces)
        b, length = len(records), n_pre + n_suf
        input_ids = torch.full((b, length), self.ids.pad, dtype=torch.long)
        segments = torch.full((b, length), int(Seg.PAD), dtype=torch.long)
        for i, (pre, pre_seg, suf, suf_seg) in enumerate(pieces):
            lo, hi = n_pre - len(pre), n_pre + len(suf)
            input_ids[i, lo:hi] = torch.tensor(pre + suf)
            segments[i, lo:hi] = torch.tensor(pre_seg + suf_seg)
        labels = torch.where((segments == Seg.ANSWER) & self.with_answer, input_ids, IGNORE)
        attention_mask = (segments != Seg.PAD).long()
        mm_types = (input_ids == self.ids.image_pad).int()
        position_ids = self._positions(input_ids, mm_types, segments, grid_thw, is_thought)
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "segments": segments,
            "attention_mask_4d": build_mask(segments), "position_ids": position_ids,
            "mm_token_type_ids": mm_types, "pixel_values": pixel_values, "image_grid_thw": grid_thw,
            "labels": labels, "latent_start": n_pre, "num_latents": self.k,
            "idx": torch.tensor([r.idx for r in records]),
        }

    def _positions(self, input_ids, mm_types, segments, grid_thw, is_thought: list[bool]) -> torch.Tensor:
        """3D M-RoPE positions, invariant to the thought images (see the module docstring)."""
        valid = segments != Seg.PAD
        thought = segments == Seg.THOUGHT_IMAGE
        student_grids = grid_thw[[not t for t in is_thought]] if grid_thw is not None else None
        pos = self.rope(input_ids, mm_types, student_grids, (valid & ~thought).long())
        if thought.any():
            full = self.rope(input_ids, mm_types, grid_thw, valid.long())
            pos = torch.where(thought[None], full, pos)
        return pos


def drop_latents(batch: dict, k: int) -> dict:
    """Keep the first k latent slots of a batch built with more (stage3 samples K per step).

    The slots are column-aligned, so dropping columns gives exactly the batch the collator builds
    for k: the mask rule is per segment, and the text after the slots moves k' - k positions back.
    """
    k_old, s = batch["num_latents"], batch["latent_start"]
    if not 0 <= k <= k_old:
        raise ValueError(f"k must be in 0..{k_old}, got {k}")
    if k == k_old:
        return batch
    dev = batch["input_ids"].device
    length = batch["input_ids"].shape[1]
    keep = torch.cat([torch.arange(s + k, device=dev), torch.arange(s + k_old, length, device=dev)])
    out = dict(batch, num_latents=k)
    for key in ("input_ids", "attention_mask", "segments", "mm_token_type_ids", "labels"):
        out[key] = batch[key][:, keep]
    out["attention_mask_4d"] = batch["attention_mask_4d"][:, :, keep][:, :, :, keep]
    pos = batch["position_ids"][:, :, keep].clone()
    moved = out["segments"][:, s + k:] != Seg.PAD  # padding keeps the position the collator gives it
    pos[:, :, s + k:] -= (k_old - k) * moved
    out["position_ids"] = pos
    return out
