"""Deterministic synthetic datasets with visual thought steps: "count" (below), "hops" (lcot.toy.hops) and
"moves" (lcot.toy.moves).

`python -m lcot.toy.synthetic --task hops` writes the multi-hop pointer task, `--task moves` the walk on a
grid; both store their difficulty (the number of steps) in each record's extra `hops` field and the state
after each step in `states`.

The count task:

Each record has one question image (a scene of 3-9 non-overlapping shapes) and two
thought images: ``t0`` keeps only the asked colour (other shapes faint grey) and ``t1``
keeps only the asked colour *and* kind, each target boxed in black with a number tag.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image, ImageDraw

from lcot import config
from lcot.config import option
from lcot.console import progress
from lcot.errors import LcotInputError, check_counts, check_output, cli_errors
from lcot.io import build_folder
from lcot.toy import hops, moves

FORMAT_VERSION = 1
COLORS = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (235, 180, 10)}
KINDS = ("circle", "square", "triangle")
FAINT = (222, 222, 222)
COUNT_WEIGHTS = (1, 3, 3, 3, 2, 2)  # P(answer = 0..5); 0 is possible but rarer
SUPERSAMPLE = 4  # draw large, then downsample: cheap antialiasing
GAP = 0.04  # minimum free space between shapes, in image-width units
DIGITS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float  # centre, in [0, 1] image units
    y: float
    r: float  # circumradius-like size, in image units

    def extent(self) -> tuple[float, float, float, float]:
        """Tight bounding box (x0, y0, x1, y1) of the drawn shape, in image units."""
        if self.kind == "triangle":
            return self.x - 0.866 * self.r, self.y - self.r, self.x + 0.866 * self.r, self.y + 0.5 * self.r
        h = 0.9 * self.r if self.kind == "circle" else 0.75 * self.r
        return self.x - h, self.y - h, self.x + h, self.y + h


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    color: str  # asked colour
    kind: str  # asked kind

    @property
    def same_color(self) -> list[Shape]:
        return [s for s in self.shapes if s.color == self.color]

    @property
    def targets(self) -> list[Shape]:
        """Shapes to count, left to right (the order of their number tags)."""
        return sorted((s for s in self.same_color if s.kind == self.kind), key=lambda s: (s.x, s.y))

    @property
    def question(self) -> str:
        return f"How many {self.color} {self.kind}s are in the image?"

    @property
    def answer(self) -> str:
        c, k = len(self.same_color), len(self.targets)
        first = f"Keeping only the {self.color} shapes leaves {_plural(c, self.color + ' shape')}."
        second = f"Of these, {k} {'is a' if k == 1 else 'are'} {self.kind}{'' if k == 1 else 's'}."
        return f"{first} {second}\n#### {k}"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _place(rng: random.Random, specs: list[tuple[str, str]]) -> tuple[Shape, ...] | None:
    """Random non-overlapping placement (largest first); None if the scene got too crowded."""
    radii = sorted((rng.uniform(0.065, 0.105) for _ in specs), reverse=True)
    placed: list[Shape] = []
    for (kind, color), r in zip(specs, radii):
        lo, hi = 1.06 * r + 0.03, 1 - 1.06 * r - 0.03
        for _ in range(500):
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if all((x - s.x) ** 2 + (y - s.y) ** 2 >= (1.06 * (r + s.r) + GAP) ** 2 for s in placed):
                placed.append(Shape(kind, color, x, y, r))
                break
        else:
            return None
    return tuple(placed)


def make_scene(seed: int, index: int) -> Scene:
    """Scene of record ``index``; independent of ``n`` so datasets with more records extend smaller ones."""
    rng = random.Random(f"lcot-synthetic:{seed}:{index}")
    color, kind = rng.choice(sorted(COLORS)), rng.choice(KINDS)
    k = rng.choices(range(len(COUNT_WEIGHTS)), weights=COUNT_WEIGHTS)[0]
    m = rng.randint(1 if k == 0 else 0, 2)  # same colour, other kind: makes the colour filter step matter
    total = min(9, max(3, k + m + rng.randint(1, 4)))
    specs = [(kind, color)] * k + [(rng.choice([x for x in KINDS if x != kind]), color) for _ in range(m)]
    specs += [(rng.choice(KINDS), rng.choice([c for c in sorted(COLORS) if c != color])) for _ in range(total - k - m)]
    rng.shuffle(specs)
    while (shapes := _place(rng, specs)) is None:
        pass
    return Scene(shapes, color, kind)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, S: int, fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = (v * S for v in s.extent())
    if s.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif s.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(s.x * S, y0), (x1, y1), (x0, y1)], fill=fill)


def _draw_tag(draw: ImageDraw.ImageDraw, text: str, x: float, y: float, u: int) -> None:
    """Black tag with white digits from a 3x5 bitmap font (no font files, so byte-stable output)."""
    x, y = round(x), round(y)
    draw.rectangle((x, y, x + (4 * len(text) + 1) * u - 1, y + 7 * u - 1), fill=(0, 0, 0))
    for i, ch in enumerate(text):
        for j, bit in enumerate(DIGITS[int(ch)]):
            if bit == "1":
                px, py = x + (1 + 4 * i + j % 3) * u, y + (1 + j // 3) * u
                draw.rectangle((px, py, px + u - 1, py + u - 1), fill=(255, 255, 255))


def _tag_spot(box: tuple[float, ...], w: float, h: float, S: int,
              taken: list[tuple[float, ...]]) -> tuple[float, float]:
    """First spot just outside ``box`` that stays in the image and covers nothing in ``taken``."""
    x0, y0, x1, y1 = box
    for x, y in ((x0, y0 - h), (x0, y1), (x0 - w, y0), (x1, y0), (x1 - w, y0 - h), (x1 - w, y1)):
        if 0 <= x <= S - w and 0 <= y <= S - h and not any(
                x < b[2] and b[0] < x + w and y < b[3] and b[1] < y + h for b in taken):
            return x, y
    return min(max(0.0, x0), S - w), min(max(0.0, y0), S - h)


def render(scene: Scene, size: int, stage: str) -> Image.Image:
    """Render stage ``q`` (question), ``t0`` (colour filter) or ``t1`` (boxed, numbered targets)."""
    S = size * SUPERSAMPLE
    img = Image.new("RGB", (S, S), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        keep = stage == "q" or (s.color == scene.color and (stage == "t0" or s.kind == scene.kind))
        _draw_shape(draw, s, S, COLORS[s.color] if keep else FAINT)
    if stage == "t1":
        pad, width, u = 0.025 * S, max(2 * SUPERSAMPLE, round(0.022 * S)), max(1, round(0.016 * S))
        targets = scene.targets
        boxes = [tuple(v * S + d for v, d in zip(s.extent(), (-pad, -pad, pad, pad))) for s in targets]
        taken = boxes + [tuple(v * S for v in s.extent()) for s in scene.shapes if s not in targets]
        for number, box in enumerate(boxes, 1):
            draw.rectangle(box, outline=(0, 0, 0), width=width)
            w, h = (4 * len(str(number)) + 1) * u, 7 * u
            x, y = _tag_spot(box, w, h, S, [b for b in taken if b is not box])
            taken.append((x, y, x + w, y + h))
            _draw_tag(draw, str(number), x, y, u)
    return img.resize((size, size), Image.Resampling.BOX)


def _count_record(root: Path, i: int, seed: int, image_size: int) -> dict:
    scene, stem = make_scene(seed, i), f"images/{i:06d}"
    for stage in ("q", "t0", "t1"):
        render(scene, image_size, stage).save(root / f"{stem}_{stage}.png", format="PNG", compress_level=6)
    return {"question": scene.question, "answer": scene.answer, "question_image_paths": [f"{stem}_q.png"],
            "thought_image_paths": [f"{stem}_t0.png", f"{stem}_t1.png"]}


def _hops_record(root: Path, i: int, seed: int, cols: int, rows: int, max_hops: int, task: str = "hops") -> dict:
    module = hops if task == "hops" else moves
    make = hops.make_puzzle if task == "hops" else moves.make_walk
    puzzle, stem = make(seed, i, cols, rows, max_hops), f"images/{i:06d}"
    names = []
    for stage, img in module.images(puzzle).items():
        img.save(root / f"{stem}_{stage}.png", format="PNG", compress_level=6)
        names.append(f"{stem}_{stage}.png")
    return {"question": puzzle.question, "answer": puzzle.answer, "question_image_paths": names[:1],
            "thought_image_paths": names[1:], "hops": puzzle.hops, "states": puzzle.states}


def _write_dataset(root: Path, n: int, n_test: int, record) -> None:
    (root / "images").mkdir()
    lines = [json.dumps(record(root, i), ensure_ascii=False) + "\n"
             for i in progress(range(n), desc="synthetic records", unit="rec")]
    (root / "train.jsonl").write_text("".join(lines[: n - n_test]), encoding="utf-8")
    (root / "test.jsonl").write_text("".join(lines[n - n_test:]), encoding="utf-8")


def _manifest_params(out: Path) -> dict | None:
    """Parameters of the complete dataset in ``out`` (the manifest is written last), else None."""
    manifest = out / "dataset.json"
    if not (manifest.is_file() and (out / "train.jsonl").is_file() and (out / "test.jsonl").is_file()):
        return None
    return json.loads(manifest.read_text(encoding="utf-8")).get("params")


def generate(output_dir: str | Path, n: int = 200, seed: int = 0, test_fraction: float = 0.2,
             image_size: int = 112, overwrite: bool = False, task: str = "count", cols: int = 4, rows: int = 2,
             max_hops: int = 4) -> dict[str, Path]:
    """Write ``train.jsonl``, ``test.jsonl``, ``images/`` and ``dataset.json`` atomically into ``output_dir``.

    task "count" (this module's shapes; ``image_size``) or "hops" (``lcot.toy.hops``; a ``cols`` x ``rows``
    grid, 1..``max_hops`` hops). An existing complete dataset with the same parameters is reused as is;
    one with other parameters (or any other non-empty folder) raises unless ``overwrite`` is set.
    """
    if n < 1 or not 0.0 <= test_fraction <= 1.0 or image_size < 16:
        raise ValueError("need n >= 1, 0 <= test_fraction <= 1, image_size >= 16 "
                         f"(got {n}, {test_fraction}, {image_size})")
    out = Path(output_dir)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    params: dict = {"format_version": FORMAT_VERSION, "n": n, "seed": seed, "test_fraction": test_fraction}
    if task == "count":
        params["image_size"] = image_size
        record = partial(_count_record, seed=seed, image_size=image_size)
    elif task in ("hops", "moves"):
        (hops.make_puzzle if task == "hops" else moves.make_walk)(seed, 0, cols, rows, max_hops)  # checks first
        params.update(task=task, cols=cols, rows=rows, max_hops=max_hops)
        record = partial(_hops_record, seed=seed, cols=cols, rows=rows, max_hops=max_hops, task=task)
    else:
        raise ValueError(f"task must be 'count', 'hops' or 'moves', got {task!r}")
    if out.exists() and not overwrite:
        found = _manifest_params(out)
        if found == params:
            return paths
        if found is not None or any(out.iterdir()):
            raise FileExistsError(f"{out} holds a different dataset (params {found}, wanted {params}); "
                                  "pass overwrite=True (--overwrite) to replace it")
    n_test = round(n * test_fraction)

    def build(tmp: Path) -> None:
        _write_dataset(tmp, n, n_test, record)
        info = {"params": params, "num_train": n - n_test, "num_test": n_test}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    # a concurrent run that finished the same dataset first is as good as ours
    build_folder(out, build, lambda found: _manifest_params(found) == params)
    return paths


@dataclass
class SyntheticConfig:
    """The flags of `python -m lcot.toy.synthetic`."""

    output_dir: str = option(help="folder to create (written atomically)")
    task: str = option("count", "count: how many shapes of a colour and kind; hops: follow pointers on a grid; "
                       "moves: a walk of arrow moves on a grid (for both, difficulty = steps, stored in the field "
                       "'hops')", choices=("count", "hops", "moves"))
    cols: int = option(4, "hops, moves: grid columns")
    rows: int = option(2, "hops, moves: grid rows (cols x rows cells, at most 8)")
    max_hops: int = option(4, "hops, moves: steps are drawn uniformly in 1..max_hops")
    n: int = option(200, "number of records")
    seed: int = option(0, "random seed")
    test_fraction: float = option(0.2, "share of records in test.jsonl")
    image_size: int = option(112, "count: square image side in pixels")
    overwrite: bool = option(False, "replace an existing dataset with other params")


def check(args: SyntheticConfig) -> None:
    """Refuse flags that cannot work before anything is written (one line each, with a hint)."""
    check_output("--output_dir", args.output_dir)
    least = {"--n": (args.n, 1, "records"), "--image_size": (args.image_size, 16, "pixels a side")}
    if args.task in ("hops", "moves"):
        least.update({"--cols": (args.cols, 1, "grid columns"), "--rows": (args.rows, 1, "grid rows"),
                      "--max_hops": (args.max_hops, 1, "hops at most")})
    check_counts((flag, value, low, f"it is the number of {what}") for flag, (value, low, what) in least.items())
    if not 0.0 <= args.test_fraction <= 1.0:
        raise LcotInputError("--test_fraction", f"must be in [0, 1], got {args.test_fraction}",
                             "it is the share of records in test.jsonl, e.g. 0.2")
    if args.task in ("hops", "moves"):
        try:
            (hops.make_puzzle if args.task == "hops" else moves.make_walk)(args.seed, 0, args.cols, args.rows,
                                                                            args.max_hops)
        except ValueError as err:
            raise LcotInputError(f"--task {args.task}", str(err), f"at most {len(hops.COLOURS)} cells (--cols x "
                                 "--rows), and --max_hops below the number of cells (moves: at most --cols)") from None


@cli_errors  # a full disk: one line, exit code 4 (lcot.errors)
def main(argv: list[str] | None = None) -> None:
    prog = "python -m lcot.toy.synthetic"
    about = "Generate a synthetic dataset (JSONL + PNGs): shape counting, the multi-hop pointer task or grid moves."
    args = config.parse(SyntheticConfig, argv, prog, about)
    check(args)
    try:
        paths = generate(args.output_dir, args.n, args.seed, args.test_fraction, args.image_size, args.overwrite,
                         args.task, args.cols, args.rows, args.max_hops)
    except FileExistsError as err:
        raise LcotInputError("--output_dir", str(err).partition("; ")[0],
                             "pass --overwrite to replace it, or choose another folder") from None
    for split, path in paths.items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{split}: {count} records -> {path}")


if __name__ == "__main__":
    main()
