"""The environment recipes agree, and outputs stay out of git and out of the linter."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _conda_pip_requirements() -> dict[str, str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = {}
    for line in lines[start + 1:]:
        m = re.match(r"\s+- (.+)", line)
        if not m or line.strip().startswith("#"):
            break
        req = m.group(1).strip()
        if not req.startswith("-e"):
            reqs[_name(req)] = req
    return reqs


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    conda = _conda_pip_requirements()
    assert set(conda) == set(wanted)
    assert conda["transformers"] == "transformers==5.17.0" == wanted["transformers"]  # the pin the GPUs run
    for name, req in wanted.items():
        if name != "torch":  # torch: pyproject takes any >= floor, conda pins the CPU build (see the file)
            assert conda[name] == req, name


def test_design_packages_are_all_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert {"torch", "transformers", "accelerate", "jupyterlab", "matplotlib", "ipywidgets", "pillow",
            "nbval"} <= names
    assert "torchvision" not in names  # breaks beside the CPU torch


def test_outputs_are_ignored_by_git_and_ruff(tmp_path):
    for path in ("runs/demo/tiny/vocab.json", "checkpoints/x/model.safetensors", "teacher_latents/a.pt",
                 "outputs/s1/tokenizer.json", ".venv/bin/python"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert res.returncode == 0, f"{path} is not git-ignored"
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["extend-exclude"]
    assert {"runs", "outputs", "checkpoints", "teacher_latents"} <= set(ruff)


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
