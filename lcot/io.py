"""Small helpers every layer uses (a leaf: imports only lcot.errors): atomic writes, the output-inside-input
check, and moving a batch to a device."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import torch

from lcot.errors import writing


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(f) on a temporary file beside `path`, then rename it over `path`: never a half-written file
    (a kill leaves at most a hidden temporary, removed on failure). A full disk is reported naming `path`."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets, not for results
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_json(path: str | Path, obj: object, indent: int = 2) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=indent) + "\n").encode()))


def save_torch(path: str | Path, obj: object) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def build_folder(out: str | Path, build: Callable[[Path], None],
                 same_as_ours: Callable[[Path], bool] | None = None) -> Path:
    """Build a folder in a temporary sibling with build(tmp), then rename it to `out`: an interrupted build
    leaves no half-written `out`. What `out` holds (empty, or being replaced) is moved aside first. If the
    rename fails because another process put a folder there meanwhile, it is kept when same_as_ours(out).
    A full disk is reported naming `out`; the temporary is removed."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with writing(out):
            build(tmp)
        tmp.chmod(0o755)  # mkdtemp's folder is private
        if same_as_ours and out.exists() and same_as_ours(out):
            return out  # another process finished the same folder meanwhile: keep it (readers may use it)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (same_as_ours and same_as_ours(out)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def inside(path: str | Path, folder: str | Path) -> bool:
    """Is `path` the folder itself or somewhere inside it (after resolving links and '..')?"""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def to_device(batch: Mapping, device: torch.device | str) -> dict:
    """A collator batch with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
