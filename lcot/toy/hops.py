"""The multi-hop pointer task: a task where thought images matter and difficulty is the number of hops.

The question image is a grid of cells, one per merged vision token (28 x 28 px): each cell is a node
with its own colour in the top half and, in the bottom half, the colour of the node it points to.
One cell is framed in white, the start. The question asks for the colour reached after following
`hops` pointers. Thought image j is the same grid with the frame on the node reached after j hops,
so the last thought image frames the answer: reading it is easy perception, while answering from
the question image alone means composing `hops` look-ups (find the cell whose top colour is the
current bottom colour), which gets harder as the hops grow.

The pointers form one cycle through all nodes, so no node points to itself and every hop (up to
nodes - 1) lands on a new node; the answer is uniform over the colours. Each record carries two
extra JSONL fields: `hops` (the difficulty) and `states` (the colour after each hop, for probes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CELL = 28  # pixels: one merged vision token (patch 14 x spatial merge 2)
FRAME = 3  # pixels around each cell's colour fields: black, or white on the framed cell
# Eight saturated colours, far apart in RGB, named by words the tiny tokenizer knows.
COLOURS = {"red": (230, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 240), "yellow": (240, 230, 30),
           "cyan": (30, 230, 230), "magenta": (230, 40, 230), "orange": (250, 140, 10), "purple": (120, 40, 170)}
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Puzzle:
    colours: tuple[str, ...]  # colour of the node in each cell, row-major
    target: tuple[int, ...]  # target[i]: the cell that cell i points to
    start: int  # the framed cell of the question image
    hops: int
    cols: int

    def path(self) -> list[int]:
        """Cells visited after each hop (length `hops`)."""
        cells, cell = [], self.start
        for _ in range(self.hops):
            cell = self.target[cell]
            cells.append(cell)
        return cells

    @property
    def states(self) -> list[str]:
        return [self.colours[c] for c in self.path()]

    @property
    def question(self) -> str:
        return f"Follow {self.hops} pointers from the framed cell. Which colour do you reach?"

    @property
    def answer(self) -> str:
        return f"{' -> '.join([self.colours[self.start], *self.states])}\n#### {self.states[-1]}"


def make_puzzle(seed: int, index: int, cols: int = 4, rows: int = 2, max_hops: int = 4) -> Puzzle:
    """Puzzle of record `index`, independent of the dataset size (bigger datasets extend smaller ones)."""
    n = cols * rows
    if n > len(COLOURS):
        raise ValueError(f"a {cols}x{rows} grid needs {n} colours, there are {len(COLOURS)}")
    if not 1 <= max_hops < n:
        raise ValueError(f"max_hops must be in 1..{n - 1} for {n} nodes, got {max_hops}")
    rng = random.Random(f"lcot-hops:{seed}:{index}")
    colours = tuple(rng.sample(sorted(COLOURS), n))
    order = rng.sample(range(n), n)  # one cycle through every cell
    target = [0] * n
    for a, b in zip(order, order[1:] + order[:1]):
        target[a] = b
    return Puzzle(colours, tuple(target), rng.randrange(n), rng.randint(1, max_hops), cols)


def render(p: Puzzle, framed: int) -> Image.Image:
    """The grid with cell `framed` framed in white."""
    rows = len(p.colours) // p.cols
    img = Image.new("RGB", (p.cols * CELL, rows * CELL), BLACK)
    draw = ImageDraw.Draw(img)
    half = CELL // 2
    for i, name in enumerate(p.colours):
        x, y = (i % p.cols) * CELL, (i // p.cols) * CELL
        if i == framed:
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=WHITE)
        draw.rectangle((x + FRAME, y + FRAME, x + CELL - 1 - FRAME, y + half - 1), fill=COLOURS[name])
        draw.rectangle((x + FRAME, y + half, x + CELL - 1 - FRAME, y + CELL - 1 - FRAME),
                       fill=COLOURS[p.colours[p.target[i]]])
    return img


def images(p: Puzzle) -> dict[str, Image.Image]:
    """{"q": question image, "t1".. "t{hops}": thought images}."""
    out = {"q": render(p, p.start)}
    out.update({f"t{j}": render(p, cell) for j, cell in enumerate(p.path(), 1)})
    return out
