"""The README is executable: its CPU commands run as written; the others (a real 7B checkpoint, the GPU-sized
experiment) are parsed by the very argument parsers of their commands, so a renamed or removed flag fails here.

The CPU blocks run in a temporary folder (their relative `runs/...` paths land there), in README order.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[list[str]]:
    """Each ```bash block as its commands (continuation lines joined, comments dropped)."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        joined = body.replace("\\\n", " ")
        blocks.append([line.split("  #")[0].strip() for line in joined.splitlines()
                       if line.strip() and not line.strip().startswith("#")])
    return blocks


def inline_commands() -> list[str]:
    """`python -m ...` commands shown inline with arguments (a bare module name is a reference, not a command)."""
    return [c for c in re.findall(r"`(python -m lcot\.[^`]+)`", README) if " --" in c]


def _block(marker: str) -> list[str]:
    found = [b for b in bash_blocks() if any(marker in c for c in b)]
    assert len(found) == 1, f"one README block holds {marker!r}"
    return found[0]


def _run(cmd: str, cwd: Path) -> None:
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_readme_shows_the_commands_this_test_runs():
    blocks = bash_blocks()
    assert ["make demo", "make test"] == [c.split()[0] + " " + c.split()[1] for c in blocks[0]]
    assert len(blocks) == 5  # two commands, the embedded default, the hops tour, the experiment, the real 7B


def test_cpu_commands_run_as_written(tmp_path):
    for cmd in _block("lcot.toy.tiny --output_dir runs/tiny") + _block("--task hops --output_dir runs/hops"):
        _run(cmd, tmp_path)
    for cmd in inline_commands():
        if cmd.startswith("python -m lcot.toy.synthetic"):
            _run(cmd, tmp_path)
    assert (tmp_path / "runs" / "h_s3" / "lcot.json").is_file() and (tmp_path / "runs" / "eval.json").is_file()


def test_gpu_and_real_model_commands_parse():
    from lcot import experiment, precompute_teacher_latents
    from lcot.pipeline import evaluate, train

    parsers = {"lcot.main": train.parser, "lcot.precompute_teacher_latents": precompute_teacher_latents.parser,
               "lcot.pipeline.evaluate": evaluate.parser, "lcot.experiment": experiment.parser}
    checked = 0
    for cmd in _block("python -m lcot.experiment --name") + _block("M=/path/to/Qwen2.5-VL-7B-Instruct"):
        if cmd.startswith("M="):
            continue
        argv = shlex.split(cmd.replace("$M", "/path/to/Qwen2.5-VL-7B-Instruct"))
        assert argv[:2] == ["python", "-m"] and argv[2] in parsers, cmd
        parsers[argv[2]]().parse_args(argv[3:])  # argparse exits on an unknown or malformed flag
        checked += 1
    assert checked == 6
