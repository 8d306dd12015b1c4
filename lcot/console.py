"""What the commands print while they run (a leaf: imports nothing from lcot): labelled progress bars, and
the libraries' own output kept to what a user needs unless `-v/--verbose` asks for all of it.

Conventions: bars go to stderr (tqdm's default, so stdout stays clean for a pipe), informational lines to
stdout, warnings and errors to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

PIPE_REDRAW_S = 10.0  # a bar written into a pipe or file redraws this rarely (in a terminal: 10 times a second)


def _notebook_bars() -> bool:
    from tqdm.auto import tqdm

    return any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def progress(iterable: Iterable | None = None, *, desc: str, in_pipe: bool = True, **kwargs: Any):
    """One labelled tqdm.auto bar (a widget in a notebook). Into a pipe or a file it redraws every
    PIPE_REDRAW_S seconds (tqdm's tenth of a second made a log of hundreds of `\\r` redraws per loop), or not at
    all with in_pipe=False (for a loop that prints its own progress lines)."""
    from tqdm.auto import tqdm

    if not (sys.stderr.isatty() or _notebook_bars()):
        kwargs.setdefault("mininterval", PIPE_REDRAW_S)
        if not in_pipe:
            kwargs["disable"] = True
    return tqdm(iterable, desc=desc, **kwargs)


def quiet_libraries(verbose: bool = False) -> None:
    """A command's start: without verbose, transformers draws no bars of its own ("Loading weights", "Writing
    model shards": a sub-second bar at each load and save, eight of each in `make demo`); with verbose, all
    that transformers shows by default. Its warnings stay either way."""
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers logs errors only inside the block (for a call whose warning is expected; say why at the
    call), and its verbosity is restored after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
