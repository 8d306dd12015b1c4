"""The environment recipes agree, and outputs stay out of git and out of the linter."""

from __future__ import annotations

import re
import shlex
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


def _commands(script: str) -> list[list[str]]:
    """The shell commands of a script, one token list a line (comments and blank lines left out)."""
    return [shlex.split(line, comments=True) for line in script.splitlines() if shlex.split(line, comments=True)]


def _make_dry_run(target: str) -> list[list[str]]:
    """What `make TARGET` would run (make -n: variables expanded, nothing executed), one token list a command."""
    res = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in res.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def _pytest_args(command: list[str]) -> list[str] | None:
    """The arguments after `-m pytest` of a command (a python that runs pytest), else None."""
    for i in range(1, len(command) - 1):
        if command[i:i + 2] == ["-m", "pytest"] and command[i - 1].endswith("python"):
            return command[i + 2:]
    return None


def test_ci_runs_the_readme_test_command():
    commands = _commands((ROOT / ".ci" / "run").read_text())
    assert ["set", "-euo", "pipefail"] in commands  # a failing make stops CI with its exit code
    assert commands[-1] == ["make", "test"]
    # make test: ruff, then pytest over every test, then every notebook under nbval (flags: make test-fast)
    runs = _make_dry_run("test")
    assert [c[1:] for c in runs if c[1:4] == ["-m", "ruff", "check"]] == [["-m", "ruff", "check", "lcot", "tests",
                                                                          "benchmarks"]], runs
    pytests = [a for a in map(_pytest_args, runs) if a is not None]
    assert pytests == [["-q", "tests"], ["-q", "--nbval-lax", "notebooks"]], runs
    # the README's first bash block: the two commands for a fresh clone
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert [c[:2] for c in _commands(block)] == [["make", "demo"], ["make", "test"]]


def test_quick_and_gpu_test_targets_select_by_marker():
    assert [a for a in map(_pytest_args, _make_dry_run("test-fast")) if a is not None] == [
        ["-q", "-m", "not slow and not gpu", "tests"]]
    assert [a for a in map(_pytest_args, _make_dry_run("test-gpu")) if a is not None] == [["-q", "-m", "gpu", "tests"]]
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {m.partition(":")[0] for m in pytest_ini["markers"]} == {"gpu", "slow"}
    assert "--strict-markers" in pytest_ini["addopts"].split()  # a misspelt marker is an error, not a no-op


def test_one_version_in_the_package_its_metadata_and_the_citation():
    import importlib.metadata

    import yaml

    import lcot

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lcot.__version__"}
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    installed = importlib.metadata.version("lcot")
    assert installed == lcot.__version__, f"installed metadata {installed}: reinstall (pip install -e .)"
    assert cff["version"] == lcot.__version__
    assert cff["cff-version"] == "1.2.0" and cff["license"] == project["project"]["license"] == "Apache-2.0"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d[^\]]*)\] - (\d{4}-\d\d-\d\d)$", changelog, re.M)
    assert released and released[0] == (lcot.__version__, str(cff["date-released"]))  # the newest release


def test_pre_commit_runs_ruff_with_the_project_settings_and_not_its_formatter():
    import yaml

    repos = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    hooks = {h["id"]: h for r in repos if r["repo"] == "https://github.com/astral-sh/ruff-pre-commit"
             for h in r["hooks"]}
    assert set(hooks) == {"ruff-check"}
    assert not hooks["ruff-check"].get("args")  # pyproject.toml's [tool.ruff] as it is
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert "pre-commit" in {_name(r) for r in dev}
