"""The notebooks as stored: numbered, outputs cleared, one parameter cell, no re-implemented core logic.

`pytest --nbval-lax notebooks` executes them (see notebooks/conftest.py); this file checks what a
diff reviewer relies on without running them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = ["00_quickstart", "01_data_and_format", "02_attention_mask", "03_stage1_format", "04_teacher_latents",
            "05_stage2_thought_images", "06_stage3_latent_only", "07_inference_and_evaluation"]
PATHS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# A code cell that matches one of these builds its own mask, collator, loss or training loop: that logic
# belongs to lcot (lcot.core.mask, lcot.core.collate, lcot.core.loss, lcot.pipeline.trainer), and notebooks call it.
FORBIDDEN = {
    "defines a mask/collator/loss/training function":
        re.compile(r"\bdef\s+\w*(mask|collat|loss|train|optimi|latent_step|forward)\w*\s*\(", re.I),
    "defines a collator/trainer/dataset class": re.compile(r"\bclass\s+\w*(collat|trainer|dataset|mask)\w*", re.I),
    "builds a mask by hand": re.compile(r"torch\.(where|tril|triu)\s*\(|\.masked_fill_?\s*\(|\btril\s*\("),
    "computes a loss by hand": re.compile(r"cross_entropy\s*\(|cosine_similarity\s*\(|mse_loss\s*\(|\bnn\.\w*Loss\("),
    "runs a training loop": re.compile(r"\.backward\s*\(|\boptim\.\w+\s*\(|optimizer\.step\s*\(|\.zero_grad\s*\("),
}


def code_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def violations(source: str) -> list[str]:
    return [why for why, pattern in FORBIDDEN.items() if pattern.search(source)]


def test_every_numbered_notebook_is_there():
    assert [p.stem for p in PATHS] == EXPECTED


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_outputs_cleared(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for i, cell in enumerate(book.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in book.metadata, f"{path.name} stores widget state: clear it"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_one_parameter_cell_first(path):
    book = nbformat.read(path, as_version=4)
    cells = [c for c in book.cells if c.cell_type == "code"]
    first = cells[0]
    assert "parameters" in first.metadata.get("tags", [])
    for name, default in (("MODEL", '"tiny"'), ("DATA", '"shapes"'), ("DEVICE", '"cpu"')):
        assert re.search(rf"^{name} = {default}", first.source, re.M), f"{path.name}: {name} default"
    assert not any("parameters" in c.metadata.get("tags", []) for c in cells[1:])
    for c in cells[1:]:  # parameters are set in one place only
        assert not re.search(r"^(MODEL|DATA|DEVICE|K|STEPS) = ", c.source, re.M), f"{path.name}: {c.source[:60]}"
    assert f'setup("{path.stem}", MODEL, DATA, DEVICE)' in cells[1].source, "own run folder, named after the file"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_no_cell_reimplements_the_core(path):
    for source in code_cells(path):
        assert not violations(source), f"{path.name}: {violations(source)} in\n{source}"


def test_the_core_check_catches_reimplementations():
    bad = {
        "def build_my_mask(seg):\n    return seg": "defines a mask/collator/loss/training function",
        "class MyCollator:\n    pass": "defines a collator/trainer/dataset class",
        "m = torch.where(seg == 3, 0, 1)": "builds a mask by hand",
        "loss = F.cross_entropy(logits, y)": "computes a loss by hand",
        "for b in loader:\n    loss.backward()\n    opt.step()": "runs a training loop",
    }
    for source, why in bad.items():
        assert why in violations(source), source
    fine = "stage1 = run_stage(stage='stage1', **S.train_flags(STEPS))\nplot_mask(b['attention_mask_4d'][0, 0])"
    assert not violations(fine)


def test_figure_names_are_unique_across_notebooks():
    names: dict[str, str] = {}
    for path in PATHS:
        for source in code_cells(path):
            for name in re.findall(r'S\.save\([^;]*?"([\w.-]+\.png)"', source, re.S):
                assert name not in names, f"{name} saved by {names[name]} and {path.stem}"
                names[name] = path.stem
    assert {"mask_stage2.png", "cosine_stage2.png", "cosine_vs_k_stage3.png", "loss_stage3.png",
            "teacher_similarity.png", "causal_use.png"} <= set(names)


# -- runs never rewrite the committed figures/ (only `make figures` does) -----------------------------------------
ROOT = NOTEBOOK_DIR.parent


def git_status() -> list[str]:
    """`git status --porcelain` of the checkout, untracked files listed one by one (ignored ones are not)."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    return done.stdout.splitlines()


def test_default_figure_paths_leave_the_checkout_clean(tmp_path, monkeypatch, tiny_dir, data_dir):
    """The demo's figure writer and a notebook's `S.save`, with their default folders, on tiny inputs."""
    import matplotlib.pyplot as plt

    from lcot import demo
    from lcot.lab.notebook import FIGURES_ENV, RUN_DIR_ENV, setup
    from lcot.pipeline.runs import METRICS_FILE

    before = git_status()
    # the demo: its default --figures, relative to the folder `make demo` runs in (the checkout), is ignored by git;
    # the figures are written with that default relative to a scratch folder, so a real demo's figures stay intact
    default = demo.DemoConfig().figures
    ignored = subprocess.run(["git", "check-ignore", "-q", default + "/x.png"], cwd=ROOT)
    assert not Path(default).is_absolute() and ignored.returncode == 0, f"{default} is not an ignored run folder"
    run = tmp_path / "demo_run"
    shutil.copytree(tiny_dir, run / "warmup")
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s, "ce": 1.0 / s, "align": 0.01 / s,
                               "cos_per_position": [0.5, 0.6]}) + "\n" for s in (1, 2, 3))
    for stage in demo.STAGES:
        (run / stage).mkdir(parents=True, exist_ok=True)
        (run / stage / METRICS_FILE).write_text(rows)
    monkeypatch.chdir(tmp_path)
    made = demo.figures(run, Path(default), 2, data_dir / "train.jsonl")
    assert made and all(p.resolve().is_relative_to(tmp_path / default) for p in made)
    # a notebook: setup's default folders (no LCOT_FIGURES_DIR), run from the checkout
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(FIGURES_ENV, raising=False)
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path / "nb_runs"))
    s = setup("test_paths", threads=None)
    saved = s.save(plt.subplots()[0], "teacher_similarity.png")
    assert saved == tmp_path / "nb_runs" / "figures" / "teacher_similarity.png"
    # without LCOT_RUN_DIR the run root is runs/notebooks of the checkout, and its figures/ is ignored
    assert subprocess.run(["git", "check-ignore", "-q", "runs/notebooks/figures/x.png"], cwd=ROOT).returncode == 0
    plt.close("all")
    after = git_status()
    assert not [line for line in after if line[3:].startswith("figures/")], after
    assert after == before, "a run changed the checkout"


@pytest.mark.parametrize("stem", ["04_teacher_latents", "07_inference_and_evaluation"])
def test_degenerate_results_are_announced_not_narrated(stem):
    """The prose says what a degenerate run looks like and cites the committed GPU results for a real one."""
    book = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    prose = "\n".join(c.source for c in book.cells if c.cell_type == "markdown")
    assert "What to look for" in prose and "WARNING:" in prose and "results/hops_tiny" in prose
    assert "If accuracy and answers do not move, the answer ignores" not in prose  # said only of a non-constant model
    for number in re.findall(r"\b\d\.\d{3}\b", prose):  # every number quoted is one the README reports
        assert number in (ROOT / "README.md").read_text(), f"{stem} quotes {number}, which the README does not"


def test_the_demo_mask_figure_draws_the_runs_thought_visibility(tmp_path, tiny_dir, data_dir):
    """A step-wise run's figure shows latent slot 1 reading thought image 1 only; a run without lcot.json, all."""
    from lcot import demo
    from lcot.core.mask import Seg

    run = tmp_path / "warmup"
    shutil.copytree(tiny_dir, run)

    def images_seen_by_slot_1() -> set[int]:
        b = demo.mask_batch(run, data_dir / "train.jsonl", 2)
        seg, steps, mask = b["segments"][0], b["steps"][0], b["attention_mask_4d"][0, 0]
        slot = int((seg == Seg.LATENT).nonzero()[0])
        thought = seg == Seg.THOUGHT_IMAGE
        return set(steps[thought & mask[slot]].tolist())

    assert images_seen_by_slot_1() == {1, 2}
    (run / "lcot.json").write_text(json.dumps({"thought_visibility": "stepwise"}))
    assert images_seen_by_slot_1() == {1}
