"""One exception type for bad user input, so CLIs can print it without a traceback; the output-path check."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class LcotInputError(ValueError):
    """Bad input: the message names the file, line and field, and says how to fix it."""

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where, self.problem, self.hint = where, problem, hint
        msg = f"{where}: {problem}" if where else problem
        super().__init__(msg + (f"\n  hint: {hint}" if hint else ""))


def cli_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Turn LcotInputError into one clear message on stderr and exit code 2 (no traceback).

    Ctrl-C prints one line and exits 130: teacher files and checkpoints already written are complete.
    """

    @wraps(main)
    def wrapped(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except LcotInputError as err:
            print(f"lcot: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("lcot: interrupted; files already written are complete: run the same command again to resume "
                  "(training: add --resume_from_checkpoint)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped


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
