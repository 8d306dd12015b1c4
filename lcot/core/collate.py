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
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from lcot.console import progress as bar
from lcot.core.mask import VISIBILITY, Seg, build_mask
from lcot.core.record import Record, load_image
from lcot.core.tokens import IGNORE, TokenIds


def decode_pixels(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """pixel_values from the collator's exact uint8 codes (rows, 3, p) and its table (3, 256): one gather,
    done where the codes are (on the GPU, after a copy of a quarter of the bytes)."""
    lut = lut.to(codes.device)
    return lut[torch.arange(3, device=codes.device)[:, None], codes.long()].reshape(codes.shape[0], -1)


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


class PixelCodec:
    """Exact uint8 codes for pixel_values: the image processor rescales and normalises uint8 pixels per
    channel, so each value is one of 256 per channel. Codes take a quarter of the memory of float32;
    rows that would not round-trip exactly are kept as float32 instead."""

    def __init__(self, image_processor) -> None:
        self.lut: torch.Tensor | None = None
        try:
            ip = image_processor
            x = np.tile(np.arange(256, dtype=np.uint8)[None, None, :], (3, 1, 1))
            lut = ip.normalize(ip.rescale(x, ip.rescale_factor), ip.image_mean, ip.image_std)
            self.lut = torch.from_numpy(np.ascontiguousarray(lut[:, 0, :], dtype=np.float32))  # (3, 256)
            self.scale = torch.tensor(ip.image_std, dtype=torch.float64)[:, None] / ip.rescale_factor
            self.shift = torch.tensor(ip.image_mean, dtype=torch.float64)[:, None] / ip.rescale_factor
        except (AttributeError, TypeError, ValueError):  # another processor: keep float32
            self.lut = None

    def encode(self, pv: torch.Tensor) -> torch.Tensor:
        if self.lut is None or pv.dtype != torch.float32 or pv.shape[1] % 3:
            return pv
        rows = pv.reshape(pv.shape[0], 3, -1).double()
        codes = (rows * self.scale + self.shift).round().clamp(0, 255).to(torch.uint8)
        return codes if torch.equal(self.decode(codes), pv) else pv  # exact, or not coded at all

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return decode_pixels(stored, self.lut) if stored.dtype == torch.uint8 else stored


@dataclass
class Encoded:
    """One record in one setting: everything the batch needs from it, independent of the other rows."""

    prefix: list[int]  # ids through <abs_vis_token>
    prefix_segments: list[int]
    suffix: list[int]  # latent slots, </abs_vis_token>, answer (or reserved columns)
    suffix_segments: list[int]
    positions: torch.Tensor  # (3, len(prefix) + len(suffix)) M-RoPE positions
    pixels: torch.Tensor | None  # pixel_values rows (float32, or PixelCodec's uint8 codes)
    grids: torch.Tensor | None  # (images, 3)


class Collator:
    """Build batches for one setting: K latent slots, with or without question/thought images.

    visual_cot=True shows the thought images to the answer too; `visibility` says which thought image each
    latent slot sees ("all", "stepwise", "cumulative"; see lcot.core.mask).
    with_answer=False builds a generation prompt instead: the prefix, K slots, </abs_vis_token> and
    `reserve` answer columns to be filled by decoding (their mask rows and positions are ready).
    cache=True keeps every record's encoding (tokens, positions, exact pixel codes) in memory, so images
    are read and processed once per run (`prepare` fills it up front). Its batches carry pixel_values as the
    uint8 codes plus their table `pixel_lut`; the model decodes them (decode_pixels) to exactly
    the pixel values of an uncached batch.
    """

    def __init__(self, processor, config, num_latents: int, thought_images: bool,
                 question_images: bool = True, with_answer: bool = True, reserve: int = 0,
                 visual_cot: bool = False, cache: bool = False, visibility: str = "all") -> None:
        if num_latents < 0:
            raise ValueError(f"num_latents must be >= 0, got {num_latents}")
        if visibility not in VISIBILITY:
            raise ValueError(f"visibility must be one of {VISIBILITY}, got {visibility!r}")
        self.visibility = visibility
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.ids = TokenIds.from_tokenizer(self.tokenizer)
        self.num_latents, self.thought_images, self.question_images = num_latents, thought_images, question_images
        self.with_answer, self.reserve, self.visual_cot = with_answer, reserve, visual_cot
        self.merge = config.vision_config.spatial_merge_size
        self.rope = RopeIndex(config)
        self.codec = PixelCodec(processor.image_processor)
        self.cache: dict[int, Encoded] | None = {} if cache else None

    # -- one record -> token pieces -------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
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
        for tok in self._encode_text(prompt):
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
        suffix = [self.ids.latent_pad] * self.num_latents + [self.ids.latent_end]
        if self.with_answer:
            suffix += self._encode_text("\n" + rec.final_answer) + [self.ids.im_end]
        else:
            suffix += [self.ids.pad] * self.reserve
        return ids, segs, suffix, [Seg.LATENT] * self.num_latents + [Seg.ANSWER] * (len(suffix) - self.num_latents)

    def _image_paths(self, rec: Record) -> tuple[list, list[bool]]:
        paths = list(rec.question_images) if self.question_images else []
        thought = [False] * len(paths)
        if self.thought_images:
            paths += list(rec.thought_images)
            thought += [True] * len(rec.thought_images)
        return paths, thought

    def encode(self, rec: Record) -> Encoded:
        """The record's tokens, segments, positions and pixel values (from the cache when it has them)."""
        if self.cache is not None and rec.idx in self.cache:
            return self.cache[rec.idx]
        paths, is_thought = self._image_paths(rec)
        pixels = grid_thw = None
        if paths:
            out = self.processor.image_processor(images=[load_image(p) for p in paths], return_tensors="pt")
            pixels, grid_thw = out["pixel_values"], out["image_grid_thw"]
        pre, pre_seg, suf, suf_seg = self._record(rec, list(grid_thw) if grid_thw is not None else [])
        ids, segs = torch.tensor([pre + suf]), torch.tensor([pre_seg + suf_seg])
        positions = self._positions(ids, segs, grid_thw, is_thought)[:, 0]
        enc = Encoded(pre, pre_seg, suf, suf_seg, positions, pixels, grid_thw)
        if self.cache is not None:
            enc.pixels = self.codec.encode(pixels) if pixels is not None else None
            self.cache[rec.idx] = enc
        return enc

    def prepare(self, records: Sequence[Record], progress: bool = True) -> None:
        """Fill the cache (cache=True) for every record, with a progress bar: images are read once."""
        if self.cache is None:
            raise ValueError("prepare() needs a Collator built with cache=True")
        for rec in bar(records, desc="preprocess records", unit="rec", disable=not progress):
            self.encode(rec)

    # -- batch ------------------------------------------------------------------------------------
    def __call__(self, records: Sequence[Record]) -> dict:
        enc = [self.encode(r) for r in records]
        n_pre = max(len(e.prefix) for e in enc)
        n_suf = max(len(e.suffix) for e in enc)
        b, length = len(records), n_pre + n_suf
        input_ids = torch.full((b, length), self.ids.pad, dtype=torch.long)
        segments = torch.full((b, length), int(Seg.PAD), dtype=torch.long)
        position_ids = torch.zeros((3, b, length), dtype=torch.long)  # padding: get_rope_index's fill value
        for i, e in enumerate(enc):
            lo, hi = n_pre - len(e.prefix), n_pre + len(e.suffix)
            input_ids[i, lo:hi] = torch.tensor(e.prefix + e.suffix)
            segments[i, lo:hi] = torch.tensor(e.prefix_segments + e.suffix_segments)
            position_ids[:, i, lo:hi] = e.positions
        pixel_values = grid_thw = None
        pixels = [e.pixels for e in enc if e.pixels is not None]
        if pixels:
            coded = all(p.dtype == torch.uint8 for p in pixels)  # cached: codes, decoded by the model
            pixel_values = torch.cat(pixels if coded else [self.codec.decode(p) for p in pixels])
            grid_thw = torch.cat([e.grids for e in enc if e.grids is not None])
        labels = torch.where((segments == Seg.ANSWER) & self.with_answer, input_ids, IGNORE)
        steps = step_indices(input_ids, segments, self.ids.vision_start)
        return {
            "input_ids": input_ids, "attention_mask": (segments != Seg.PAD).long(), "segments": segments,
            "steps": steps, "attention_mask_4d": build_mask(segments, self.visual_cot, steps, self.visibility),
            "position_ids": position_ids,
            "mm_token_type_ids": (input_ids == self.ids.image_pad).int(), "pixel_values": pixel_values,
            "image_grid_thw": grid_thw, "labels": labels, "latent_start": n_pre, "num_latents": self.num_latents,
            "idx": [r.idx for r in records],  # a list: stays on the host (the trainer reads it every step)
            **({"pixel_lut": self.codec.lut} if pixel_values is not None and pixel_values.dtype == torch.uint8
               else {}),
        }

    def _positions(self, input_ids, segments, grid_thw, is_thought: list[bool]) -> torch.Tensor:
        """3D M-RoPE positions, invariant to the thought images (see the module docstring)."""
        mm_types = (input_ids == self.ids.image_pad).int()
        valid = segments != Seg.PAD
        thought = segments == Seg.THOUGHT_IMAGE
        student_grids = grid_thw[[not t for t in is_thought]] if grid_thw is not None else None
        pos = self.rope(input_ids, mm_types, student_grids, (valid & ~thought).long())
        if thought.any():
            full = self.rope(input_ids, mm_types, grid_thw, valid.long())
            pos = torch.where(thought[None], full, pos)
        return pos


def step_indices(input_ids: torch.Tensor, segments: torch.Tensor, vision_start: int) -> torch.Tensor:
    """(B, L): thought image t's tokens carry t, latent slot j carries j (both from 1), every other token 0."""
    thought, latent = segments == Seg.THOUGHT_IMAGE, segments == Seg.LATENT
    image = (thought & (input_ids == vision_start)).long().cumsum(1)
    return torch.where(thought, image, 0) + torch.where(latent, latent.long().cumsum(1), 0)


def drop_latents(batch: dict, num_latents: int) -> dict:
    """Keep the first k latent slots of a batch built with more (stage3 samples K per step).

    The slots are column-aligned, so dropping columns gives exactly the batch the collator builds
    for k: the mask rule is per segment, and the text after the slots moves k' - k positions back.
    """
    k_old, s = batch["num_latents"], batch["latent_start"]
    if not 0 <= num_latents <= k_old:
        raise ValueError(f"k must be in 0..{k_old}, got {num_latents}")
    if num_latents == k_old:
        return batch
    dev = batch["input_ids"].device
    length = batch["input_ids"].shape[1]
    keep = torch.cat([torch.arange(s + num_latents, device=dev), torch.arange(s + k_old, length, device=dev)])
    out = dict(batch, num_latents=num_latents)
    for key in ("input_ids", "attention_mask", "segments", "steps", "mm_token_type_ids", "labels"):
        if key in batch:
            out[key] = batch[key][:, keep]
    out["attention_mask_4d"] = batch["attention_mask_4d"][:, :, keep][:, :, :, keep]
    pos = batch["position_ids"][:, :, keep].clone()
    moved = out["segments"][:, s + num_latents:] != Seg.PAD  # padding keeps the position the collator gives it
    pos[:, :, s + num_latents:] -= (k_old - num_latents) * moved
    out["position_ids"] = pos
    return out
