"""The moves task (a second task family): its records follow the moves drawn in their images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lcot.toy import hops, moves
from lcot.toy.synthetic import generate

NAMES = {rgb: name for name, rgb in hops.COLOURS.items()}


def read_picture(path, rows: int, cols: int) -> tuple[int, list[str], list[tuple[int, int]]]:
    """(framed cell, colour of each cell, each drawn move as (dx, dy)), from the pixels alone."""
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    c = hops.CELL
    framed = [i for i in range(rows * cols) if (a[i // cols * c + 1, i % cols * c + 1] == 255).all()]
    colours = [NAMES[tuple(a[i // cols * c + c // 2, i % cols * c + c // 2])] for i in range(rows * cols)]
    drawn = []
    for j in range(cols):
        block = (a[rows * c:(rows + 1) * c, j * c:(j + 1) * c] == 255).all(-1)
        if not block.any():
            break
        ys, xs = np.nonzero(block)
        off = np.array([xs.mean(), ys.mean()]) - (c - 1) / 2  # a triangle's centroid lies away from its tip
        drawn.append((-int(np.sign(off[0])) if abs(off[0]) > abs(off[1]) else 0,
                      -int(np.sign(off[1])) if abs(off[1]) > abs(off[0]) else 0))
    assert len(framed) == 1
    return framed[0], colours, drawn


@pytest.mark.parametrize("cols, rows", [(4, 2), (3, 2)])
def test_moves_records_follow_the_moves_drawn_in_their_images(tmp_path, cols, rows):
    folder = generate(tmp_path / "moves", n=30, seed=0, task="moves", cols=cols, rows=rows, max_hops=3)["train"]
    lines = [json.loads(x) for x in folder.read_text().splitlines()]
    assert {r["hops"] for r in lines} == {1, 2, 3} and all(len(r["states"]) == r["hops"] for r in lines)
    for r in lines:
        cell, colours, drawn = read_picture(folder.parent / r["question_image_paths"][0], rows, cols)
        assert len(drawn) == r["hops"] and len(r["thought_image_paths"]) == r["hops"]
        for (dx, dy), state, thought in zip(drawn, r["states"], r["thought_image_paths"]):
            cell = (cell // cols + dy) % rows * cols + (cell % cols + dx) % cols
            assert colours[cell] == state
            assert read_picture(folder.parent / thought, rows, cols)[0] == cell  # thought image j frames state j
        assert r["answer"].endswith(f"#### {r['states'][-1]}")


def test_a_move_never_undoes_the_one_before():
    for i in range(300):
        w = moves.make_walk(0, i)
        cells = [w.start, *w.path()]
        assert all(a != b for a, b in zip(cells, cells[2:])), w


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="needs 9 colours"):
        moves.make_walk(0, 0, cols=3, rows=3)
    with pytest.raises(ValueError, match="max_hops in 1..cols"):
        moves.make_walk(0, 0, cols=4, rows=2, max_hops=5)
