"""The notebooks as stored: numbered, outputs cleared, one parameter cell, no re-implemented core logic.

`pytest --nbval-lax notebooks` executes them (see notebooks/conftest.py); this file checks what a
diff reviewer relies on without running them.
"""

from __future__ import annotations

import re
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
