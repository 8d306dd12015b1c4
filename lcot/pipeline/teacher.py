"""Teacher latents: computed once with the thought images visible, stored one file per record.

File `latent_last_layer_jsonl_{idx:06d}.pt` holds a dict: `latents` [k_max, hidden] (the outputs at
the latent slots, in the model's dtype), `k_max`, `hidden_size`, `dtype`, `model` (where it came
from), `model_fingerprint` (of the weights), `record_digest` (hash of the JSONL record), `idx` and `layout`:
what fixes the token sequence the latents belong to, i.e. the image processor's settings (`LAYOUT_KEYS`)
and `prefix_len`, the record's length up to and including <abs_vis_token>. Files are written to a temporary
name and renamed, so a kill leaves only complete files; a rerun keeps the valid ones (same record, k_max,
dtype, weights and processor settings) and recomputes the rest. Files written before `layout` existed still
load for training (unchecked, with a note); the precompute recomputes them.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from lcot.console import progress as progress_bar
from lcot.core.collate import Collator
from lcot.core.mask import Seg
from lcot.core.model import latent_hidden_states
from lcot.core.record import Record
from lcot.errors import LcotInputError
from lcot.io import save_torch, to_device

FILE_PATTERN = "latent_last_layer_jsonl_{idx:06d}.pt"
_TMP_RE = re.compile(r"^\.latent_last_layer_jsonl_(\d+)\.pt\..*\.tmp$")  # lcot.io.write_atomic's temporary names


def teacher_file(teacher_dir: str | Path, idx: int) -> Path:
    return Path(teacher_dir) / FILE_PATTERN.format(idx=idx)


def remove_partial_files(out_dir: Path, idxs: set[int]) -> int:
    """Delete the temporary files a killed run left for these records (each process only its own)."""
    removed = 0
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _TMP_RE.match(p.name)
            if m and int(m.group(1)) in idxs:
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of evenly spaced samples of every weight: retrained weights give another fingerprint.

    Teacher files record it, so a rerun of the precompute after the teacher model changed (e.g. stage1
    trained again into the same folder) recomputes them instead of keeping stale latents.
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024]
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


LAYOUT_KEYS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size")


@functools.cache
def _note_old_layout(folder: Path) -> None:
    """Once per folder and process: its files predate `layout`."""
    print(f"lcot: note: teacher files in {folder} do not record the image resolution they were computed "
          "at (written before lcot recorded it): --max_pixels is not checked against them; re-run the "
          "precompute to record it", file=sys.stderr)


def processor_layout(processor) -> dict[str, int]:
    """The image processor's settings that fix how many tokens each image becomes (LAYOUT_KEYS)."""
    ip = processor.image_processor
    size = getattr(ip, "size", None)
    bounds = {"min_pixels": getattr(size, "shortest_edge", None) or getattr(ip, "min_pixels", None),
              "max_pixels": getattr(size, "longest_edge", None) or getattr(ip, "max_pixels", None)}
    return {k: int(v) for k, v in {**bounds, **{k: getattr(ip, k, None) for k in LAYOUT_KEYS[2:]}}.items()
            if v is not None}


def prefix_lengths(batch: Mapping) -> list[int]:
    """Each row's length up to and including <abs_vis_token> (the collator pads on the left of latent_start)."""
    return (batch["segments"][:, : batch["latent_start"]] != Seg.PAD).sum(1).tolist()


def _check_layout(data: dict, layout: Mapping[str, int], need: bool, path: Path, where: str) -> None:
    saved = data.get("layout")
    if saved is None:
        if need:  # the precompute's resume check: unknown layout, so compute it again
            raise LcotInputError(where, "teacher file does not record its image layout (an older lcot wrote it)")
        _note_old_layout(path.parent)
        return
    for key, want in layout.items():
        have = saved.get(key)
        if have is None or have == want:
            continue
        if key == "prefix_len":
            raise LcotInputError(where, f"the teacher's sequence up to <abs_vis_token> has {have} tokens, this run's "
                                 f"has {want}", "the record's images, the chat template or the tokenizer changed "
                                 "since the precompute: re-run `python -m lcot.precompute_teacher_latents`")
        raise LcotInputError(where, f"teacher latents were computed with {key} {have}, this run has {key} {want}",
                             "train with the same --max_pixels as the precompute, or re-run `python -m "
                             "lcot.precompute_teacher_latents` with this run's --max_pixels (the image tokens and "
                             "every later position differ: the latents belong to another sequence)")


def read_teacher(path: Path, record: Record, hidden_size: int | None = None, num_latents: int | None = None,
                 dtype: torch.dtype | None = None, fingerprint: str | None = None,
                 layout: Mapping[str, int] | None = None, need_layout: bool = False,
                 visibility: str | None = None) -> torch.Tensor:
    """Load and check one teacher file against its record and the model; returns latents [k_max, H].

    fingerprint: require the file to come from exactly these weights (the precompute's resume check;
    training on it later uses other weights by design).
    layout: the values (processor settings, and `prefix_len` where comparable) the file's `layout` must
    match; a file without one passes with a one-time note, unless need_layout.
    visibility: the --thought_visibility the file must have been computed with (files that record none: "all").
    """
    where = f"{path} (record {record.where})"
    hint = "re-run `python -m lcot.precompute_teacher_latents` for this JSONL and model"
    if not path.is_file():
        raise LcotInputError(where, "teacher latent file is missing", hint)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        latents = data["latents"]
    except Exception as err:  # any unpickling or format problem is a corrupted file
        raise LcotInputError(where, f"teacher latent file is corrupted ({type(err).__name__})", hint) from None
    if fingerprint is not None and data.get("model_fingerprint") != fingerprint:
        raise LcotInputError(where, "teacher latents were computed with other model weights", hint)
    if data.get("record_digest") != record.digest:
        raise LcotInputError(where, "the JSONL record changed after its teacher latents were computed",
                             hint + " (files of changed records are recomputed)")
    if hidden_size is not None and latents.shape[-1] != hidden_size:
        raise LcotInputError(where, f"teacher hidden size {latents.shape[-1]} != model hidden size {hidden_size}",
                             "the teacher was computed with another model; " + hint)
    if num_latents is not None and latents.shape[0] < num_latents:
        raise LcotInputError(where, f"--latent_size {num_latents} is above the teacher's k_max {latents.shape[0]}",
                             f"use --latent_size <= {latents.shape[0]}, or precompute with --k_max {num_latents}")
    if dtype is not None and latents.dtype != dtype:
        raise LcotInputError(where, f"teacher dtype {latents.dtype} != training dtype {dtype}",
                             "precompute and train with the same precision (both with or both without --bf16)")
    if layout is not None:
        _check_layout(data, layout, need_layout, path, where)
    have = data.get("thought_visibility", "all")
    if visibility is not None and have != visibility:
        raise LcotInputError(where, f"teacher latents were computed with --thought_visibility {have}, this run has "
                             f"{visibility}", f"train with --thought_visibility {have}, or re-run `python -m "
                             f"lcot.precompute_teacher_latents` with --thought_visibility {visibility}")
    return latents


def is_complete(path: Path, record: Record, k_max: int, hidden_size: int, dtype: torch.dtype,
                fingerprint: str | None = None, layout: Mapping[str, int] | None = None,
                visibility: str = "all", visual_cot: bool = False) -> bool:
    """A valid file for this record and model, computed with these processor settings (`layout`; a file
    without a recorded layout is computed again). prefix_len is not compared: it would cost encoding every
    kept record, and for the same record and images it follows from the processor settings."""
    try:
        latents = read_teacher(path, record, hidden_size, k_max, dtype, fingerprint, layout, need_layout=True,
                               visibility=visibility)
    except LcotInputError:
        return False
    return latents.shape[0] == k_max and torch.load(path, weights_only=True).get("visual_cot", False) == visual_cot


def shape_key(rec: Record) -> tuple:
    """What decides a record's sequence length, cheaply: its images' sizes (read from the file headers, not
    decoded) and its question's length. Sorting by it puts records of one shape in one batch."""
    sizes = []
    for path in (*rec.question_images, *rec.thought_images):
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except OSError:  # unreadable now: the collator will say so; any position in the order will do
            sizes.append((0, 0))
    return len(sizes), tuple(sizes), len(rec.question)


def batches_by_shape(records: Sequence[Record], batch_size: int) -> list[list[Record]]:
    """Batches of records of similar shapes (sorted by shape_key): less padding per batch, and repeated prefix
    lengths, whose CUDA graph then replays (lcot.fast.graph)."""
    ordered = sorted(records, key=shape_key)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


@torch.no_grad()
def precompute(model, processor, records: Sequence[Record], out_dir: str | Path, k_max: int, batch_size: int = 1,
               model_name: str = "", rank: int = 0, world_size: int = 1, progress: bool = True,
               feed: str = "continuous", num_workers: int = 0, visibility: str = "all",
               visual_cot: bool = False) -> dict[str, int]:
    """Write the teacher files of `records` (this process's share: every world_size-th record).

    The collator, mask and positions the model was trained with: thought images visible, latent mode, `feed`
    (see lcot.core.model.latent_hidden_states), the thought images' `visibility` and, for a visual-CoT
    warm-up, `visual_cot` (its <abs_vis_token>, whose output is slot 1's input, sees the thought images). Both
    are recorded in each file. Batches hold records of similar shapes
    (`batches_by_shape`); `num_workers` DataLoader processes build them while the model runs. Returns counts.
    """
    out_dir = Path(out_dir)
    hidden, dtype = model.config.text_config.hidden_size, model.dtype
    mine = [r for i, r in enumerate(records) if i % world_size == rank]
    remove_partial_files(out_dir, {r.idx for r in mine})
    fingerprint, layout = weights_fingerprint(model), processor_layout(processor)
    todo = [r for r in mine
            if not is_complete(teacher_file(out_dir, r.idx), r, k_max, hidden, dtype, fingerprint, layout,
                               visibility, visual_cot)]
    collate = Collator(processor, model.config, k_max, thought_images=True, visibility=visibility,
                       visual_cot=visual_cot)
    was_training = model.training
    model.eval()
    bar = progress_bar(total=len(todo), desc="teacher latents", unit="rec", disable=not progress)
    chunks = batches_by_shape(todo, batch_size)
    loader = DataLoader(chunks, batch_size=None, collate_fn=collate, num_workers=num_workers,
                        pin_memory=model.device.type == "cuda")
    for chunk, batch in zip(chunks, loader):
        prefixes = prefix_lengths(batch)
        batch = to_device(batch, model.device)
        _, latents = latent_hidden_states(model, batch, feed=feed, answer=False)
        for rec, lat, prefix in zip(chunk, latents, prefixes):
            save_torch(teacher_file(out_dir, rec.idx),
                       {"latents": lat.to(dtype).cpu().clone(), "k_max": k_max, "hidden_size": hidden,
                        "dtype": str(dtype), "model": model_name, "model_fingerprint": fingerprint,
                        "record_digest": rec.digest, "idx": rec.idx, "layout": {**layout, "prefix_len": prefix},
                        "thought_visibility": visibility, "visual_cot": visual_cot})
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return {"records": len(mine), "computed": len(todo), "kept": len(mine) - len(todo)}
