"""A user's document says what the kit does and what was measured, never how the kit was made.

The repository's tracked text files (docs, code, scripts, notebooks, configuration; `results/` only through its
folders' README.md) must not speak of work sessions ("the tenth session", "this round", "the twelfth stop"),
of issue numbers ("issue #5", "issue 11's rows", "the issue's targets"), nor of the GPU lending tool that ran
the measurements ("device tool", "lent", "calls 1-4 named an H200 kind"). A measurement is named by its date,
commit and card instead.

The patterns are written so that ordinary English and code pass: pytest's `scope="session"` and session-scoped
fixtures, "round trip", "rounding", "stop the run", "calls" as in function calls (`test_the_patterns_spare_...`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its own examples would match
TEXT_SUFFIXES = {".md", ".py", ".sh", ".txt", ".toml", ".yml", ".yaml", ".cfg", ".ipynb"}

_ORDINAL = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth"
            r"|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|\d+(?:st|nd|rd|th))")
_KIND = r"`?(?:nvidia-)?h[12]00(?:-x\d)?`?"

# (name, pattern): each pattern is case-insensitive and matched against one line at a time.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(rx, re.I)) for name, rx in [
    # "the tenth session", "first round", "the eleventh session's", "the twelfth stop" (not "round-robin")
    ("ordinal session/round", rf"\b{_ORDINAL}\s+(?:work\s+)?(?:session|round)s?\b(?![-\w])(?!\s+trip)"),
    ("ordinal stop", rf"\bthe\s+{_ORDINAL}\s+stops?\b(?![-\w])"),
    # "this session", "last round", "the previous session's" (not "this session-scoped fixture")
    ("this/last session", r"\b(?:this|last|earlier|next|previous|prior|later|current|that)\s+(?:session|round)s?"
                          r"\b(?![-\w])(?!\s+trip)"),
    ("sessions", r"\bsessions\b"),
    # "issue #5", "issue 11's rows", "issues 9 and 11" (not "to issue 2 kernels", a verb before a count)
    ("issue number", r"\bissues?\s*#\s*\d+|\bissues?\s+\d+\b(?![.,]\d)(?!\s*(?:kernels?|launch(?:es)?|syncs?|ops|copies"
                     r"|reads?|writes?|requests?|instructions?|commands?)\b)"),
    ("the issue's", r"\bthe\s+issue(?:'s|’s)"),
    ("stop N", r"\bstops?\s+#?\d+\b(?![.,]\d)(?!\s*(?:steps?|records?|tokens?|times)\b)"),
    # "call 6", "calls 1-4", "call 2's files" (not "calls 3 times")
    ("call N", r"\bcalls?\s+#?\d+(?:\s*(?:-|–|to|and)\s*\d+)?\b(?![.,]\d)(?!\s*(?:times|functions?|helpers?)\b)"),
    ("device tool", r"\b(?:device|lending)\s+tools?\b|\bthe\s+(?:device|tool)\s+(?:gives|gave|returns|returned"
                    r"|brought|lends|lent)\b|\bdevice\s+time\b"),
    ("lent/lending", r"\b(?:lent|lending)\b"),
    ("H200 kind", rf"\b{_KIND}\s+kinds?\b|\bnamed\s+(?:an?\s+|the\s+)?{_KIND}|\bnvidia-h[12]00(?:-x\d)?\b"),
    ("which card a call got", r"\b(?:card|machine)\s+(?:a|each|the|every)\s+call\s+got\b|\ba\s+call\s+got\b"),
]]


def offending(text: str) -> list[tuple[int, str, str]]:
    """(line number, pattern name, line) for every line of `text` that speaks of how the software was made."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for name, rx in PATTERNS:
            if rx.search(line):
                found.append((n, name, line.strip()))
                break
    return found


def checked_files() -> list[str]:
    """The tracked text files the rule covers (paths relative to the repository root)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = []
    for path in filter(None, listed.decode().split("\0")):
        p = Path(path)
        if path == SELF or not (p.suffix in TEXT_SUFFIXES or p.name == "Makefile"):
            continue
        if p.parts[0] == "results" and p.name != "README.md":  # measured output: tables, logs, summaries
            continue
        out.append(path)
    return out


def _read(path: str) -> str | None:
    try:
        data = (ROOT / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):  # deleted in the work tree, or a submodule
        return None
    if b"\0" in data[:8192]:  # binary
        return None
    return data.decode("utf-8", errors="replace")


def test_no_file_says_how_the_software_was_made():
    files = checked_files()
    assert "README.md" in files
    hits = [f"{path}:{n}: [{name}] {line[:160]}" for path in files
            for n, name, line in offending(_read(path) or "")]
    assert not hits, f"{len(hits)} line(s) speak of how the software was made:\n" + "\n".join(hits)


OFFENDING = [
    "measured in the tenth session on one H100",
    "The eleventh session's last changes had run on a CPU only.",
    "the first round's path ran at 86-91 records/s",
    "first round",
    "the twelfth stop dropped its pass over the answer",
    "the 12th session",
    "as measured this session",
    "the last round's tables",
    "the previous session's baseline",
    "in earlier sessions",
    "Sessions of work",
    "see issue #5",
    "Issue 11's rows on the default path",
    "the issue's targets",
    "issue 9's target",
    "fixed at stop 3",
    "the files of call 6",
    "calls 1-4 named an H200 kind",
    "named an H200",
    "named the `nvidia-h200` kind",
    "the device tool gives H100s",
    "no device time was left",
    "the H200 was not lent",
    "GPU lending",
    "which card a call got",
]

BENIGN = [
    '@pytest.fixture(scope="session")',
    "a session-scoped fixture built once per session",
    "def tiny_dir(tmp_path_factory):",
    "a save/load round trip keeps every tensor",
    "fused kernels differ only in rounding",
    "the records' round-trips through JSON",
    "It rounds like fused kernels do, a few fp32 ulps a step.",
    "a NaN loss will stop the run before the optimizer step",
    "the run stops at the first bad step",
    "it calls latent_step K times; calls to torch.compile are cached",
    "the function calls 3 times",
    "the medians of the two timed calls 1.82 s against 0.54 s",
    "a run that stops 0.5 s later",
    "round-robin over --gpus",
    "rounds 0.5 to even",
    "we issue 2 kernels per layer",
    "the first issue is the mask",
    "the silent fallback",
    "stop 20 steps early",
    "the H200's 141 GB",
    "an H200 card",
]


def test_the_patterns_find_each_planted_line(tmp_path):
    planted = tmp_path / "planted.md"
    planted.write_text("\n".join(["A clean first line."] + OFFENDING + ["A clean last line."]) + "\n")
    found = {n for n, _, _ in offending(planted.read_text())}
    missed = [line for i, line in enumerate(OFFENDING, 2) if i not in found]
    assert not missed, f"not found: {missed}"
    assert 1 not in found and len(OFFENDING) + 2 not in found


@pytest.mark.parametrize("line", BENIGN)
def test_the_patterns_spare_ordinary_english_and_code(line):
    assert offending(line) == [], line
