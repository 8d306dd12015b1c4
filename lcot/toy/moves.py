"""The moves task: a walk on a grid, a second task family whose step is a move, not a pointer look-up.

The question image is a grid of colour cells (one per merged vision token, 28 x 28 px) with the start cell
framed in white, above a row of move cells: each shows a white arrow (up, down, left or right), in the order
the moves are made, then black cells. The grid wraps around, so every move is possible. The question asks for
the colour of the cell reached after the moves. Thought image j is the same picture with the frame on the cell
reached after j moves, so the last one frames the answer; answering from the question image alone means
composing `hops` moves. Records carry `hops` (the number of moves, the difficulty) and `states` (the colour
after each move, for probes), as the hops task does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from lcot.toy.hops import BLACK, CELL, COLOURS, FRAME, WHITE

MOVES = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}


@dataclass(frozen=True)
class Walk:
    colours: tuple[str, ...]  # colour of each cell, row-major
    start: int  # the framed cell of the question image
    moves: tuple[str, ...]  # one per hop
    cols: int
    max_hops: int  # width of the move row (the picture's size does not depend on the record)

    @property
    def hops(self) -> int:
        return len(self.moves)

    def path(self) -> list[int]:
        """Cells reached after each move."""
        rows, cells, cell = len(self.colours) // self.cols, [], self.start
        for move in self.moves:
            dx, dy = MOVES[move]
            x, y = cell % self.cols, cell // self.cols
            cell = (y + dy) % rows * self.cols + (x + dx) % self.cols
            cells.append(cell)
        return cells

    @property
    def states(self) -> list[str]:
        return [self.colours[c] for c in self.path()]

    @property
    def question(self) -> str:
        return f"Make the {self.hops} moves shown below the grid from the framed cell. Which colour do you reach?"

    @property
    def answer(self) -> str:
        return f"{' -> '.join([self.colours[self.start], *self.states])}\n#### {self.states[-1]}"


def make_walk(seed: int, index: int, cols: int = 4, rows: int = 2, max_hops: int = 4) -> Walk:
    """Walk of record `index`, independent of the dataset size. No move returns to the cell just left."""
    n = cols * rows
    if n > len(COLOURS):
        raise ValueError(f"a {cols}x{rows} grid needs {n} colours, there are {len(COLOURS)}")
    if cols < 3 or not 1 <= max_hops <= cols:
        raise ValueError(f"need cols >= 3 and max_hops in 1..cols (the move row), got cols {cols}, max_hops "
                         f"{max_hops}")
    rng = random.Random(f"lcot-moves:{seed}:{index}")
    colours = tuple(rng.sample(sorted(COLOURS), n))
    moves: list[str] = []
    for _ in range(rng.randint(1, max_hops)):
        moves.append(rng.choice([m for m in MOVES if not _undoes(moves[-1] if moves else None, m, rows)]))
    return Walk(colours, rng.randrange(n), tuple(moves), cols, max_hops)


def _undoes(previous: str | None, move: str, rows: int) -> bool:
    """Would `move` return to the cell before `previous`? (On two rows, up and down both switch rows.)"""
    if previous is None:
        return False
    vertical = previous in ("up", "down") and move in ("up", "down")
    return MOVES[previous] == tuple(-v for v in MOVES[move]) or rows == 2 and vertical


def _arrow(draw: ImageDraw.ImageDraw, x: int, y: int, move: str) -> None:
    c, r = CELL // 2, CELL // 2 - 5
    dx, dy = MOVES[move]
    tip = (x + c + dx * r, y + c + dy * r)
    side = [(x + c - dx * r + dy * r, y + c - dy * r + dx * r), (x + c - dx * r - dy * r, y + c - dy * r - dx * r)]
    draw.polygon([tip, *side], fill=WHITE)


def render(w: Walk, framed: int) -> Image.Image:
    """The grid with cell `framed` framed in white, above the row of moves."""
    rows = len(w.colours) // w.cols
    img = Image.new("RGB", (w.cols * CELL, (rows + 1) * CELL), BLACK)
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(w.colours):
        x, y = (i % w.cols) * CELL, (i // w.cols) * CELL
        if i == framed:
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=WHITE)
        draw.rectangle((x + FRAME, y + FRAME, x + CELL - 1 - FRAME, y + CELL - 1 - FRAME), fill=COLOURS[name])
    for j, move in enumerate(w.moves):
        _arrow(draw, j * CELL, rows * CELL, move)
    return img


def images(w: Walk) -> dict[str, Image.Image]:
    """{"q": question image, "t1".. "t{hops}": thought images}."""
    return {"q": render(w, w.start), **{f"t{j}": render(w, cell) for j, cell in enumerate(w.path(), 1)}}
