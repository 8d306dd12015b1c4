"""A run folder's metadata, read and written in one place: lcot.json (the stage's settings, in every
checkpoint and in the final model), the latent metrics log, and the list of complete checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lcot.io import write_json

LCOT_CONFIG = "lcot.json"
METRICS_FILE = "latent_metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoint-N folders of a run, oldest (lowest N) first.

    Only complete ones exist under that name: LatentTrainer writes each checkpoint into a staging
    folder and renames it when everything is written.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def write_lcot_config(folder: str | Path, info: dict) -> None:
    write_json(Path(folder) / LCOT_CONFIG, info)  # never a half-written lcot.json


def read_lcot_config(folder: str | Path) -> dict:
    """lcot.json as a dict ({} when absent); runs from before K's one name said "latent_size"."""
    path = Path(folder) / LCOT_CONFIG
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if "latent_size" in saved:
        saved.setdefault("num_latents", saved.pop("latent_size"))
    return saved


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    by_step = {r["step"]: r for r in rows}  # a resumed run logs steps again: the later row wins
    return [by_step[s] for s in sorted(by_step)]
