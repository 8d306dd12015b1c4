"""A run folder's metadata, read and written in one place: lcot.json (the stage's settings, in every
checkpoint and in the final model), the latent metrics log, the list of complete checkpoints, and the lock
that keeps a second run out of a folder a live run is writing."""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lcot.errors import LcotInputError
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


def lock_file(folder: str | Path) -> Path:
    """The lock of an output folder: `.NAME.lock` beside it, so --overwrite_output_dir's rmtree of the folder
    keeps it and the finished folder holds no clutter (it is removed when the run ends)."""
    folder = Path(folder).resolve()  # one lock whichever link or relative path names the folder
    return folder.parent / f".{folder.name}.lock"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its line yet
        return "a process that has not said who it is yet"


def _busy(folder: str | Path, holder: str) -> LcotInputError:
    return LcotInputError(str(Path(folder).resolve()), f"another run is writing this folder ({holder})",
                          "wait for it to finish or stop it; two runs in one folder would mix their files. Or "
                          f"choose another output folder. The lock is {lock_file(folder)}")


def check_unlocked(folder: str | Path) -> None:
    """Refuse now if a live run holds the folder's lock (a probe that creates nothing: commands call it before
    their other folder checks, so a busy folder is called busy rather than "not empty")."""
    try:
        fd = os.open(lock_file(folder), os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: conflicts only with a holder's exclusive lock
    except BlockingIOError:
        raise _busy(folder, _holder(fd)) from None
    finally:
        os.close(fd)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the folder's lock (fcntl.flock, exclusive) for this process, or refuse: another live process holds it.

    The kernel drops the lock when its holder dies, so a killed run's leftover lock file is stale and is
    taken over. The file is removed (still locked) on release; a process that opened it just before then
    finds another inode at the path and tries again.
    """
    path = lock_file(folder)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(folder, path):
            yield path
    finally:
        for p in made:  # folders made only for the lock (e.g. a run refused for bad input): none stays behind
            try:
                p.rmdir()
            except OSError:  # not empty: the run wrote into it
                break


@contextmanager
def _locked(folder: str | Path, path: Path) -> Iterator[int]:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _busy(folder, holder) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its holder removed meanwhile: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        yield fd
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def process_state():
    """accelerate's PartialState of this run's processes, set up as Trainer sets it up: gloo on a machine
    without CUDA (Trainer's use_cpu; PartialState() alone would leave each CPU process on its own), the
    process group's timeout Trainer's ddp_timeout default (30 min: a long checkpoint save on one rank)."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=1800))


@contextmanager
def run_lock(folder: str | Path) -> Iterator[None]:
    """folder_lock for one run of one or several processes (accelerate launch): the main process takes the
    lock and every process learns the outcome, so all stop together when it is refused. Every process has
    passed its own checks (e.g. check_unlocked) before the lock is taken, so none of them finds its own run's."""
    from accelerate.utils import broadcast_object_list

    state = process_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
    with ExitStack() as stack:
        refused = None
        if state.is_main_process:
            try:
                stack.enter_context(folder_lock(folder))
            except LcotInputError as err:
                refused = (err.where, err.problem, err.hint)
            except OSError as err:  # e.g. a folder it cannot write: said to every process, not left in a collective
                refused = (str(folder), f"cannot take the folder's lock {lock_file(folder)} ({err})",
                           "choose an output folder you can write to")
        if state.num_processes > 1:
            refused = broadcast_object_list([refused], from_process=0)[0]
        if refused:
            raise LcotInputError(*refused)
        yield
