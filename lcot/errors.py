"""One exception type for bad user input, so CLIs can print it without a traceback; the output-path check;
and the one place that turns a full disk into one clear message."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device, disk quota exceeded
EXIT_DISK_FULL = 4
# torch's and safetensors' writers (C++, Rust) drop the errno: these words in a message, or almost no free
# space left where a RuntimeError interrupted a write, mean the same (torch.save to a path says only
# "unexpected pos ..." then)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")
LOW_SPACE = 16 << 20


class LcotInputError(ValueError):
    """Bad input: the message names the file, line and field, and says how to fix it."""

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where, self.problem, self.hint = where, problem, hint
        msg = f"{where}: {problem}" if where else problem
        super().__init__(msg + (f"\n  hint: {hint}" if hint else ""))


def disk_full(err: BaseException, path: str | Path | None = None) -> bool:
    """Did a write fail for lack of space? An ENOSPC/EDQUOT errno anywhere in the exception chain, the
    system's words for it in a message, or (given the path written) a RuntimeError with < 16 MiB left there."""
    seen: BaseException | None = err
    for _ in range(16):  # the chain (cause or context), bounded
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if any(text in str(seen) for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if path is not None and isinstance(err, RuntimeError):
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free < LOW_SPACE
        except OSError:
            return False
    return False


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name `path` in a full-disk error raised inside: it leaves as OSError(ENOSPC, ..., path), which
    cli_errors prints as one line. An error that already names a file keeps it (the more precise one)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, OSError) and err.errno in DISK_FULL and err.filename:
            raise
        if disk_full(err, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise


def cli_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Turn LcotInputError into one clear message on stderr and exit code 2 (no traceback), a full disk
    into one message and exit code 4.

    Ctrl-C prints one line and exits 130: teacher files and checkpoints already written are complete.
    """

    @wraps(main)
    def wrapped(*args, **kwargs) -> T:
        try:
            result = main(*args, **kwargs)
        except LcotInputError as err:
            print(f"lcot: error: {err}", file=sys.stderr)
            code = 2
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
            where = f" while writing {err.filename}" if err.filename else ""
            print(f"lcot: error: {what}{where}\n  hint: free space on that disk, then run the same command again: "
                  "files already written are complete, nothing half-written is kept (training: add "
                  "--resume_from_checkpoint)", file=sys.stderr)
            code = EXIT_DISK_FULL
        except KeyboardInterrupt:
            print("lcot: interrupted; files already written are complete: run the same command again to resume "
                  "(training: add --resume_from_checkpoint)", file=sys.stderr)
            code = 130
        except SystemExit as err:  # argparse, or a command's own code (lcot.main: 3 for NaN)
            code = err.code
        else:
            _leave_process_group()
            return result
        _exit(code)

    return wrapped


def _process_group():
    """torch.distributed when this process is in a process group (accelerate launch), else None."""
    torch = sys.modules.get("torch")  # a command that never imported torch has no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _leave_process_group() -> None:
    """Several processes: leave the group before the interpreter shuts down (a group left to shutdown aborts
    now and then: "terminate called without an active exception")."""
    dist = _process_group()
    if dist is not None:
        dist.destroy_process_group()


def _exit(code: int | str | None) -> None:
    """Exit with `code`. In a process group (every rank stops here together, with the same message) the
    process leaves the group and ends at once: gloo's threads still aborted 1 exit in 10 at interpreter
    shutdown on CPU, turning exit 4 into a SIGABRT. In one process: SystemExit, as usual."""
    dist = _process_group()
    if dist is None:
        raise SystemExit(code) from None
    try:
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def check_counts(counts: Iterable[tuple[str, float, float, str]]) -> None:
    """Refuse the first (flag, value, least, hint) whose value is below its least, with that hint."""
    for flag, value, least, hint in counts:
        if value < least:
            raise LcotInputError(flag, f"must be >= {least}, got {value}", hint)


def check_output(flag: str, path: str | Path, folder: bool = True) -> None:
    """Refuse an output path that cannot be written as asked, before any work is done: a file where a folder
    goes (or a folder where a file goes), a path under a file, a parent folder that is not writable."""
    path = Path(path).absolute()
    if folder and path.exists() and not path.is_dir():
        raise LcotInputError(flag, f"{path} is a file, not a folder", "choose a folder path (it is created)")
    if not folder and path.is_dir():
        raise LcotInputError(flag, f"{path} is a folder, not a file", "give a file path, e.g. results.json")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LcotInputError(flag, f"{path} cannot be created: {parent} is a file, not a folder",
                             "choose a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LcotInputError(flag, f"{path} cannot be created: {parent} is not writable",
                             "choose a folder you can write to")
