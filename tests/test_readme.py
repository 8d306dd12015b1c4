"""The README is executable: every `python -m lcot...` command it shows, in a code block or inline, is either run
as written or parsed by its command's own argument parser, and a command that is neither fails here.

Rule: a command runs as written, in README order, in one scratch folder (its relative `runs/...` and `data/...`
paths land there; no path is rewritten), unless it needs what a CPU test cannot give it: a real checkpoint (`$M`,
the 7B block), the GPU-sized experiment (`lcot.experiment`: 3 seeds x every row), or the full demo (`lcot.demo`,
i.e. `make demo` / `make figures`). Those are parsed by their command's parser, so a renamed or removed flag fails.
Every `make X` the README names is a Makefile target.

The one rewrite, so that the whole chain stays under two minutes on 2 CPU cores: the budget flags are capped
(`--epochs` at 1, `--max_steps` at 20, `--n` at 200 records); every other flag, path and value is the README's.
LCOT_README_AS_WRITTEN=1 runs the budgets as written too (minutes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PARSED_ONLY = ("lcot.experiment", "lcot.demo")  # GPU-sized, or minutes of CPU (see the module docstring)
BUDGET_CAPS = {"--epochs": 1, "--max_steps": 20, "--n": 200}  # the one rewrite (see the module docstring)


def bash_bodies() -> list[str]:
    """Each ```bash block's text, as written."""
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def bash_blocks() -> list[list[str]]:
    """Each ```bash block as its commands (continuation lines joined, comments dropped)."""
    blocks = []
    for body in bash_bodies():
        joined = body.replace("\\\n", " ")
        blocks.append([" ".join(line.split("  #")[0].split()) for line in joined.splitlines()
                       if line.strip() and not line.strip().startswith("#")])
    return blocks


def inline_commands() -> list[str]:
    """`python -m lcot...` commands shown inline with arguments (a bare module name is a reference, not a command)."""
    return [c for c in re.findall(r"`(python -m lcot\.[^`]+)`", README) if " --" in c]


def lcot_commands() -> list[str]:
    """Every `python -m lcot...` command of the README: the code blocks' in order, then the inline ones."""
    return [c for b in bash_blocks() for c in b if c.startswith("python -m lcot")] + inline_commands()


def parsed_only(cmd: str) -> bool:
    """The real-checkpoint block (it starts from `M=...`), the experiment and the demo: parsed, not run."""
    return cmd in _block("M=/path/to/Qwen2.5-VL-7B-Instruct") or shlex.split(cmd)[2] in PARSED_ONLY


def capped(argv: list[str]) -> list[str]:
    """argv with each budget flag's value lowered to its cap (nothing else changes)."""
    if os.environ.get("LCOT_README_AS_WRITTEN") == "1":
        return argv
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in BUDGET_CAPS:
            out[i + 1] = str(min(int(out[i + 1]), BUDGET_CAPS[arg]))
    return out


def _block(marker: str) -> list[str]:
    found = [b for b in bash_blocks() if any(marker in c for c in b)]
    assert len(found) == 1, f"one README block holds {marker!r}"
    return found[0]


def _run(cmd: str, cwd: Path) -> str:
    argv = capped(shlex.split(cmd))
    assert argv[:2] == ["python", "-m"], cmd
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


RUN_BLOCKS = ("python -m lcot.toy.tiny --output_dir runs/tiny",  # the embedded default
              "--task hops --output_dir runs/hops")  # the hops tour
PARSED_BLOCKS = ("python -m lcot.experiment", "M=/path/to/Qwen2.5-VL-7B-Instruct")  # the matrix, the real 7B


def test_the_readme_shows_the_commands_this_test_runs():
    blocks = bash_blocks()
    assert ["make demo", "make test"] == [c.split()[0] + " " + c.split()[1] for c in blocks[0]]
    # the blocks this test runs or parses are found by their content, each in exactly one block
    for marker in RUN_BLOCKS + PARSED_BLOCKS:
        _block(marker)
    # a line of a run block that is not an lcot command would be skipped silently: there is none
    for marker in RUN_BLOCKS:
        stray = [c for c in _block(marker) if not c.startswith("python -m lcot.")]
        assert not stray, f"not run by this test: {stray}"
    # every block is valid bash, and every command splits into shell words (quotes balanced)
    for body in bash_bodies():
        done = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert done.returncode == 0, f"{done.stderr}\n{body}"
    for cmd in (c for b in blocks for c in b):
        shlex.split(cmd)
    commands = lcot_commands()
    assert len(commands) >= 25 and all(c.startswith("python -m lcot.") for c in commands)


def test_the_budget_cap_touches_only_the_budget_flags(monkeypatch):
    monkeypatch.delenv("LCOT_README_AS_WRITTEN", raising=False)
    argv = shlex.split("python -m lcot.main --epochs 6 --max_steps 300 --learning_rate 2e-3 --output_dir runs/n "
                       "--n 400 --bsz 8")
    assert capped(argv) == shlex.split("python -m lcot.main --epochs 1 --max_steps 20 --learning_rate 2e-3 "
                                       "--output_dir runs/n --n 200 --bsz 8")
    assert capped(["python", "-m", "x", "--max_steps", "5"])[-1] == "5"  # below the cap: as written


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"`make ([\w-]+)`", README)) | {c.split()[1] for c in bash_blocks()[0]}
    assert named >= {"demo", "test", "lab", "setup", "figures"}
    assert named <= targets, named - targets


def test_cpu_commands_run_as_written(tmp_path):
    """Every command not parsed-only runs, in README order (the blocks, then the inline ones)."""
    outputs = {}
    for cmd in lcot_commands():
        if not parsed_only(cmd):
            outputs[cmd] = _run(cmd, tmp_path)
    assert (tmp_path / "runs" / "h_s3" / "lcot.json").is_file() and (tmp_path / "runs" / "eval.json").is_file()
    assert (tmp_path / "data" / "hops" / "test.jsonl").is_file()
    # the single-image generate command asks a held-out record's own question about its image
    generate = next(c for c in outputs if " --image " in c)
    argv = shlex.split(generate)
    image, question = argv[argv.index("--image") + 1], argv[argv.index("--question") + 1]
    data = (tmp_path / image).parents[1]
    rel = str((tmp_path / image).relative_to(data))
    held_out = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    train = (data / "train.jsonl").read_text()
    match = [r for r in held_out if rel in r["question_image_paths"]]
    assert match and rel not in train, f"{image} is not a held-out record's question image"
    assert match[0]["question"] == question
    assert outputs[generate].strip(), "generate printed no answer"


def test_gpu_and_real_model_commands_parse():
    from lcot import demo, experiment, precompute_teacher_latents
    from lcot.config import parser as config_parser
    from lcot.pipeline import evaluate, train

    parsers = {"lcot.main": train.parser, "lcot.precompute_teacher_latents": precompute_teacher_latents.parser,
               "lcot.pipeline.evaluate": evaluate.parser, "lcot.experiment": experiment.parser,
               "lcot.demo": lambda: config_parser(demo.DemoConfig, "python -m lcot.demo", "")}
    checked = [c for c in lcot_commands() if parsed_only(c)]
    for cmd in checked:
        argv = shlex.split(cmd.replace("$M", "/path/to/Qwen2.5-VL-7B-Instruct"))
        assert argv[:2] == ["python", "-m"] and argv[2] in parsers, cmd
        parsers[argv[2]]().parse_args(argv[3:])  # argparse exits on an unknown or malformed flag
    assert len(checked) >= 7
    assert any("lcot.experiment" in c for c in checked) and sum("Qwen" in c or "out_stage" in c for c in checked) == 5


def test_gpu_scripts_named_exist_parse_and_take_their_argument():
    """The GPU benchmark scripts the README shows (not run here: no GPU): each exists, is valid bash, and a
    case argument it is given is one of the script's cases."""
    shown = re.findall(r"bash (benchmarks/[\w.]+\.sh)(?: ([a-z0-9_]+))?", README)
    assert len({s for s, _ in shown}) >= 4
    for script, arg in shown:
        path = ROOT / script
        assert path.is_file(), script
        subprocess.run(["bash", "-n", str(path)], check=True)
        if arg:
            assert re.search(rf"^\s*(\w+\|)*{arg}(\|\w+)*\)", path.read_text(), flags=re.M), f"{script} {arg}"
