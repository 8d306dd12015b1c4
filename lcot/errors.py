"""One exception type for bad user input, so CLIs can print it without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
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
