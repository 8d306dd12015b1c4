"""Records: the design's JSONL format, validated line by line.

One JSON object per line with `question` (str), `answer` (str, GSM8K style: the final answer is the text
after the last `####`), `question_image_paths` and `thought_image_paths` (lists of str, order kept,
relative paths resolved against the JSONL file's folder). Unknown extra fields are allowed.

Blank lines (only white space) are skipped and do not count: a record's `idx` is its 0-based position
among the non-blank lines. Teacher files are named by that idx, so inserting blank lines keeps them
valid while inserting or removing records does not (the teacher's record hash catches that).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lcot.core.record import Record, final_answer
from lcot.core.tokens import LATENT_TOKENS
from lcot.errors import LcotInputError

FIELDS = {"question": str, "answer": str, "question_image_paths": list, "thought_image_paths": list}
_HINT_FORMAT = ('each line must be one JSON object like {"question": "...", "answer": "... #### 7", '
                '"question_image_paths": ["q.png"], "thought_image_paths": ["t0.png"]}')
_JSON_TYPES = {"NoneType": "null", "bool": "boolean", "int": "number", "float": "number", "str": "string",
               "dict": "object"}
# Control tokens of Qwen2.5-VL and of this kit: text holding one would be read as that token (an image
# placeholder without an image, an early end of turn, a latent slot), so such text is refused.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", *LATENT_TOKENS)
MAX_ASPECT = 200  # Qwen2.5-VL's image processor refuses images more than 200 times wider than high (or higher)


def _json_type(value: object) -> str:
    name = type(value).__name__
    return _JSON_TYPES.get(name, name)


def _check_image(path: Path, where: str, field: str | None) -> None:
    """Cheap but complete: PNG's verify() checks every chunk's CRC (a truncated or damaged file fails);
    other formats (JPEG: at 1/8 scale) are decoded, since their verify() does not read the image data.

    field: the JSONL field the path came from (relative to the JSONL file's folder), or None for a path given
    by a flag (`where`, e.g. --image; relative to the current folder): the wording says which.
    """
    said = f"field '{field}': " if field else ""
    if path.is_dir():
        raise LcotInputError(where, f"{said}{path} is a folder, not an image file",
                             "give the path of a PNG or JPEG file")
    if not path.is_file():
        raise LcotInputError(where, f"{said}image not found: {path}",
                             "paths are relative to the JSONL file's folder" if field else
                             f"check the path (a relative path is read from the current folder, {Path.cwd()})")
    if path.stat().st_size == 0:
        raise LcotInputError(where, f"{said}image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            im.verify()
        if fmt != "PNG":
            with Image.open(path) as im:
                im.draft("RGB", (max(w // 8, 1), max(h // 8, 1)))
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise LcotInputError(where, f"{said}not a readable image: {path} ({err})",
                             "use complete PNG or JPEG files") from None
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise LcotInputError(where, f"{said}image {path} is {w}x{h}, an aspect ratio above {MAX_ASPECT}:1 "
                             "that Qwen2.5-VL's image processor refuses", "crop or pad the image")


def parse_record(obj: object, idx: int, where: str, root: Path, check_images: bool = True) -> Record:
    if not isinstance(obj, dict):
        raise LcotInputError(where, f"expected a JSON object, got {_json_type(obj)}", _HINT_FORMAT)
    for name, kind in FIELDS.items():
        if name not in obj:
            raise LcotInputError(where, f"missing field '{name}'", _HINT_FORMAT)
        if not isinstance(obj[name], kind):
            raise LcotInputError(where, f"field '{name}' must be a {'string' if kind is str else kind.__name__}, "
                                 f"got {_json_type(obj[name])}", _HINT_FORMAT)
    for name in ("question", "answer"):
        found = [t for t in CONTROL_TOKENS if t in obj[name]]
        if found:
            raise LcotInputError(where, f"field '{name}' contains the control token {found[0]}",
                                 "the tokenizer would read it as that token, not as text: remove or rewrite it")
    images: dict[str, tuple[Path, ...]] = {}
    for name in ("question_image_paths", "thought_image_paths"):
        for i, p in enumerate(obj[name]):
            if not isinstance(p, str) or not p:
                raise LcotInputError(where, f"field '{name}'[{i}] must be a non-empty string path", _HINT_FORMAT)
        images[name] = tuple((root / p) for p in obj[name])
        if check_images:
            for p in images[name]:
                _check_image(p, where, name)
    canonical = json.dumps({k: obj[k] for k in FIELDS}, sort_keys=True, ensure_ascii=False)
    return Record(idx=idx, question=obj["question"], answer=obj["answer"],
                  final_answer=final_answer(obj["answer"], where),
                  question_images=images["question_image_paths"],
                  thought_images=images["thought_image_paths"], where=where,
                  digest=hashlib.sha256(canonical.encode()).hexdigest()[:16],
                  extra={k: v for k, v in obj.items() if k not in FIELDS})


def read_records(path: str | Path, need_thought_images: bool = False, skip_missing_thought: bool = False,
                 check_images: bool = True) -> list[Record]:
    """Read and validate a JSONL file. Raises LcotInputError naming file:line and field.

    need_thought_images: stage2 and teacher precompute need them; with skip_missing_thought, records
    without them are dropped (their idx is kept, so teacher file names stay stable).
    """
    path = Path(path)
    if not path.is_file():
        raise LcotInputError(str(path), "JSONL file not found", "check --train_jsonl")
    records: list[Record] = []
    skipped = 0
    lines = []
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise LcotInputError(f"{path}:{n}", f"not UTF-8 text (byte {err.start + 1} of the line)",
                                 "save the file as UTF-8") from None
        if line.strip():
            lines.append((n, line))
    if not lines:
        raise LcotInputError(str(path), "the JSONL file has no records (it is empty or only blank lines)",
                             _HINT_FORMAT)
    for idx, (n, line) in enumerate(lines):
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise LcotInputError(where, f"malformed JSON ({err.msg} at column {err.colno})", _HINT_FORMAT) from None
        rec = parse_record(obj, idx, where, path.parent, check_images)
        if need_thought_images and not rec.thought_images:
            if skip_missing_thought:
                skipped += 1
                continue
            raise LcotInputError(where, "field 'thought_image_paths' is empty, but this stage needs thought images",
                                 "add thought images, or pass --skip_missing_thought to skip such records")
        records.append(rec)
    if skipped:
        print(f"lcot: {path}: skipped {skipped} record(s) without thought images", file=sys.stderr)
    return records


def question_record(question: str, image_paths: list[str], idx: int = 0) -> Record:
    """A record for generation only: a question and its images (paths as given), no answer."""
    images = tuple(Path(p) for p in image_paths)
    for p in images:
        _check_image(p, "--image", None)
    return Record(idx=idx, question=question, answer="", final_answer="", question_images=images,
                  thought_images=(), where="--question", digest="")
