"""A record: one sample of the design's JSONL format, as the collator reads it (lcot.pipeline.data reads and
validates the files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lcot.errors import LcotInputError


@dataclass(frozen=True)
class Record:
    idx: int
    question: str
    answer: str
    final_answer: str
    question_images: tuple[Path, ...]
    thought_images: tuple[Path, ...]
    where: str  # "file:line", for messages
    digest: str  # hash of the raw line's content, stored with teacher latents
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # the line's other fields (e.g. "hops")


def final_answer(answer: str, where: str = "") -> str:
    """GSM8K style: the stripped text after the last '####'."""
    if "####" not in answer:
        raise LcotInputError(where, "field 'answer' has no '####'",
                             "write the final answer after '####', e.g. \"3 + 4 = 7 #### 7\"")
    final = answer.rsplit("####", 1)[1].strip()
    if not final:
        raise LcotInputError(where, "field 'answer' has an empty final answer after '####'",
                             "put the final answer after '####', e.g. \"#### 7\"")
    return final


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB (RGBA, L, P and other modes are converted, not refused)."""
    try:
        with Image.open(path) as im:
            if im.mode == "P" and "transparency" in im.info:
                return im.convert("RGBA").convert("RGB")  # as PIL advises for palette transparency
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # read_records checked it; it changed since (e.g. replaced or removed while training ran)
        raise LcotInputError(str(path), f"cannot read the image ({err})",
                             "restore the file and run the command again (training: add --resume_from_checkpoint)"
                             ) from None
