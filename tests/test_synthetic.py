"""Tests for the synthetic shape-counting dataset generator."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lcot.toy.synthetic import COLORS, KINDS, generate, main, make_scene, render


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("syn") / "data", n=50, seed=3, image_size=64)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", n=12, seed=7, image_size=48)
    b = generate(tmp_path / "b", n=12, seed=7, image_size=48)
    c = generate(tmp_path / "c", n=12, seed=8, image_size=48)
    snap_a, snap_b, snap_c = (_snapshot(p["train"].parent) for p in (a, b, c))
    assert snap_a == snap_b
    assert any(name.endswith(".png") for name in snap_a)
    assert snap_a["train.jsonl"] != snap_c["train.jsonl"]
    assert snap_a["images/000000_q.png"] != snap_c["images/000000_q.png"]


def test_split_sizes_and_manifest(dataset: dict[str, Path]) -> None:
    assert len(_records(dataset["train"])) == 40 and len(_records(dataset["test"])) == 10
    manifest = json.loads((dataset["train"].parent / "dataset.json").read_text())
    assert manifest["params"]["n"] == 50 and manifest["num_test"] == 10


def test_images_exist_rgb_and_thoughts_ordered(dataset: dict[str, Path]) -> None:
    root = dataset["train"].parent
    for rec in _records(dataset["train"]) + _records(dataset["test"]):
        assert set(rec) == {"question", "answer", "question_image_paths", "thought_image_paths"}
        assert len(rec["question_image_paths"]) == 1 and rec["question_image_paths"][0].endswith("_q.png")
        thoughts = rec["thought_image_paths"]
        assert [Path(t).stem[-2:] for t in thoughts] == ["t0", "t1"]
        for rel in rec["question_image_paths"] + thoughts:
            with Image.open(root / rel) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
        with Image.open(root / thoughts[0]) as t0, Image.open(root / thoughts[1]) as t1:
            assert t0.tobytes() != t1.tobytes()  # the second step really changes something


def test_answers_match_scene_and_vary(dataset: dict[str, Path]) -> None:
    records = _records(dataset["train"]) + _records(dataset["test"])
    finals = []
    for index, rec in enumerate(records):
        match = re.search(r"\n#### (\d+)$", rec["answer"])
        assert match, rec["answer"]
        scene = make_scene(3, index)
        count = sum(s.color == scene.color and s.kind == scene.kind for s in scene.shapes)
        assert int(match.group(1)) == count == len(scene.targets)
        assert rec["question"] == f"How many {scene.color} {scene.kind}s are in the image?"
        assert scene.color in COLORS and scene.kind in KINDS and 3 <= len(scene.shapes) <= 9
        finals.append(count)
    assert len(set(finals)) >= 3
    assert finals.count(0) < len(finals) // 3


def test_shapes_do_not_overlap_and_stay_inside() -> None:
    for index in range(30):
        shapes = make_scene(0, index).shapes
        for i, s in enumerate(shapes):
            x0, y0, x1, y1 = s.extent()
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            for t in shapes[i + 1:]:
                assert (s.x - t.x) ** 2 + (s.y - t.y) ** 2 > (s.r + t.r) ** 2


def test_target_pixels_change_between_stages() -> None:
    """Non-target shapes are greyed in t1; the question image keeps every colour."""
    scene = make_scene(0, 1)
    q, t1 = render(scene, 112, "q"), render(scene, 112, "t1")
    greyed = [s for s in scene.shapes if s not in scene.targets]
    assert greyed
    for s in greyed:
        xy = (int(s.x * 112), int(s.y * 112 + 0.2 * s.r * 112))
        assert q.getpixel(xy) != t1.getpixel(xy)


def test_reuse_and_conflict(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = generate(out, n=5, seed=1, image_size=32)
    stamp = first["train"].stat().st_mtime_ns
    assert generate(out, n=5, seed=1, image_size=32) == first
    assert first["train"].stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(FileExistsError):
        generate(out, n=6, seed=1, image_size=32)
    generate(out, n=6, seed=1, image_size=32, overwrite=True)
    assert len(_records(first["train"])) + len(_records(first["test"])) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left behind


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--output_dir", str(tmp_path / "cli"), "--n", "4", "--seed", "2", "--test_fraction", "0.25",
          "--image_size", "32"])
    printed = capsys.readouterr().out
    assert "train: 3 records" in printed and "test: 1 records" in printed
