"""Figures: the 4D mask with named blocks, loss curves, latent-teacher cosine per position over training.

Conventions of every figure here: latent positions are numbered 1..K; step and K axes tick whole numbers
(an accuracy-vs-K plot ticks exactly the evaluated K); colour ranges are fitted to the data; and a value axis
spans at least MIN_SPAN of the values' magnitude, so a 0.05% change does not look like a steep one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator

from lcot.core.mask import Seg
from lcot.lab.segments import MARKER, PART_NAMES, PARTS

SEG_COLORS = {Seg.PAD: "#dddddd", Seg.PROMPT: "#4c72b0", Seg.QUESTION_IMAGE: "#55a868", Seg.THOUGHT_IMAGE: "#c44e52",
              Seg.LATENT: "#8172b2", Seg.ANSWER: "#ccb974", MARKER: "#937860"}  # by display part
MIN_SPAN = 0.02  # a value axis spans at least this share of the largest |value| shown
TWIN_RATIO = 0.1  # an alignment curve below this share of the CE curve gets its own (right) axis


def fitted_limits(values, min_span: float = MIN_SPAN, bounds: tuple[float, float] | None = None
                  ) -> tuple[float, float]:
    """(lo, hi) around the finite values: their range, widened about its middle to at least min_span x the
    largest |value| (and 1e-6), then shifted inside `bounds` (e.g. (-1, 1) for cosines) where it can be."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return (0.0, 1.0) if bounds is None else bounds
    lo, hi = float(v.min()), float(v.max())
    span = max(hi - lo, min_span * float(np.abs(v).max()), 1e-6)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    if bounds is not None:
        if hi > bounds[1]:
            lo, hi = lo - (hi - bounds[1]), bounds[1]
        if lo < bounds[0]:
            lo, hi = bounds[0], min(hi + (bounds[0] - lo), bounds[1])
    return lo, hi


def set_value_axis(ax, values, bounds: tuple[float, float] | None = None, margin: float = 0.05) -> None:
    """y limits from `fitted_limits` with a small margin, so flat curves stay flat on the page."""
    lo, hi = fitted_limits(values, bounds=bounds)
    pad = (hi - lo) * margin
    ax.set_ylim(lo - pad, hi + pad)


def integer_axis(axis, values: Sequence[int] | None = None, max_ticks: int = 16) -> None:
    """Whole-number ticks: exactly `values` when given and few enough, else a whole-number locator."""
    if values is not None and 0 < len(values) <= max_ticks:
        axis.set_ticks(list(values))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def segment_runs(segments: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(segment or display part, start, stop)] runs of one row of labels."""
    s = segments.tolist()
    runs, start = [], 0
    for i in range(1, len(s) + 1):
        if i == len(s) or s[i] != s[start]:
            runs.append((Seg(s[start]) if s[start] != MARKER else MARKER, start, i))
            start = i
    return runs


def _part_cmap() -> ListedColormap:
    """Colour of value v + 1 (0 = blocked, white) for every display part v."""
    return ListedColormap(["white"] + [SEG_COLORS[v] for v in range(len(PART_NAMES))])


def plot_mask(mask: torch.Tensor, segments: torch.Tensor, title: str = "", ax=None, highlight: int | None = None):
    """Draw one (L, L) mask: each allowed cell coloured by the key's segment, blocks named on the axes.

    `segments`: one row of `lcot.lab.segments.display_segments(batch)` (the latent delimiters drawn as
    "latent markers"), or of the batch's own segments."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6.5))
    m, seg = mask.bool().cpu(), segments.cpu()
    img = np.where(m.numpy(), seg[None, :].expand_as(m).numpy(), -1)
    ax.imshow(img + 1, cmap=_part_cmap(), vmin=0, vmax=len(PART_NAMES), interpolation="nearest")
    for s, a, b in segment_runs(seg):
        for f in (ax.axhline, ax.axvline):
            f(a - 0.5, color="black", lw=0.4)
        if b - a >= max(2, len(seg) // 60):
            ax.text(len(seg) + 1, (a + b) / 2, PART_NAMES[s], va="center", fontsize=7, color=SEG_COLORS[s])
    if highlight is not None:
        ax.axhline(highlight, color="black", lw=1.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=SEG_COLORS[s]) for s in PARTS]
    ax.legend(handles, [PART_NAMES[s] for s in PARTS], fontsize=7, loc="upper center", title="key segment",
              title_fontsize=7, bbox_to_anchor=(0.5, -0.09), ncol=4, frameon=False)
    ax.set_xlabel("key (attended) position")
    ax.set_ylabel("query position")
    ax.set_title(title or "4D attention mask (white = blocked)")
    return ax


def plot_losses(rows: Sequence[dict], title: str = "", ax=None):
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    """Loss, CE and alignment over optimizer steps; an alignment curve dwarfed by CE (below TWIN_RATIO of it)
    gets its own axis on the right (a second axes of the figure)."""
    steps = [r["step"] for r in rows]
    curves = {key: np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
              for key in ("loss", "ce", "align") if any(r.get(key) is not None for r in rows)}
    main_max = max((np.nanmax(np.abs(v)) for k, v in curves.items() if k != "align"), default=0.0)
    twin = "align" in curves and main_max > 0 and np.nanmax(np.abs(curves["align"])) < TWIN_RATIO * main_max
    right = ax.twinx() if twin else None
    lines = []
    for i, (key, vals) in enumerate(curves.items()):
        on = right if twin and key == "align" else ax
        label = f"{key} (right axis)" if on is not ax else key
        lines += on.plot(steps, vals, marker=".", label=label, color=f"C{i}")
    shown = [v for k, v in curves.items() if not (twin and k == "align")]
    if shown:
        set_value_axis(ax, np.concatenate(shown))
    if twin:
        set_value_axis(right, curves["align"])
        right.set_ylabel("alignment loss")
    ax.set_xlabel("optimizer step")
    integer_axis(ax.xaxis)
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.legend(lines, [ln.get_label() for ln in lines])
    return ax


def cosine_matrix(rows: Sequence[dict]) -> tuple[list[int], np.ndarray]:
    """(steps, [n_logs, K] cosine per latent position; NaN where a position was not trained then)."""
    rows = [r for r in rows if r.get("cos_per_position")]
    mat = np.array([[np.nan if v is None else v for v in r["cos_per_position"]] for r in rows], dtype=float)
    return [r["step"] for r in rows], mat


def plot_cosine(rows: Sequence[dict], title: str = "", fig=None):
    """Latent-teacher cosine per latent position over training: heatmap (left) and curves (right)."""
    steps, mat = cosine_matrix(rows)
    fig = fig or plt.figure(figsize=(11, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    if not len(steps):
        ax1.text(0.5, 0.5, "no alignment logged", ha="center")
        return fig
    lo, hi = fitted_limits(mat, bounds=(-1.0, 1.0))  # the data's range: cosines often sit near 1
    im = ax1.imshow(mat.T, aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi,
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, 0.5, mat.shape[1] + 0.5))
    fig.colorbar(im, ax=ax1, label="cosine")
    ax1.set_xlabel("optimizer step")
    integer_axis(ax1.xaxis)
    ax1.set_ylabel("latent position")
    integer_axis(ax1.yaxis, range(1, mat.shape[1] + 1))
    picks = sorted({0, mat.shape[1] // 2, mat.shape[1] - 1})
    for j in picks:
        ax2.plot(steps, mat[:, j], marker=".", label=f"position {j + 1}")
    ax2.plot(steps, np.nanmean(mat, 1), color="black", lw=2, label="mean")
    set_value_axis(ax2, mat, bounds=(-1.0, 1.0))
    ax2.set_xlabel("optimizer step")
    integer_axis(ax2.xaxis)
    ax2.set_ylabel("cosine to teacher")
    ax2.legend(fontsize=7)
    fig.suptitle(title or "latent-teacher cosine")
    fig.tight_layout()
    return fig


def plot_cosine_vs_k(cos_by_k: dict[int, Sequence[float]], title: str = "", ax=None):
    """Mean cosine of each latent position for each K (stage3 evaluations)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for k, cos in sorted(cos_by_k.items()):
        ax.plot(range(1, len(cos) + 1), cos, marker="o", label=f"K={k}")
    values = [v for cos in cos_by_k.values() for v in cos]
    set_value_axis(ax, values, bounds=(-1.0, 1.0))
    kmax = max((len(c) for c in cos_by_k.values()), default=0)
    return _per_position_axes(ax, "cosine to teacher", title or "latent-teacher cosine vs K", 7, kmax)


def plot_similarity(latents: torch.Tensor, title: str = "", ax=None, label: str = "latent position"):
    """Pairwise cosine of vectors (rows), numbered 1..N on both axes (`label` names them: latent positions or
    records). The colour range is the off-diagonal values' (at least MIN_SPAN wide): collapse, every cosine near
    1, shows as one flat colour with a colour bar that reads ~1, not as structure."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    x = torch.nn.functional.normalize(latents.float(), dim=-1)
    sims = (x @ x.T).numpy()
    n = sims.shape[0]
    off = sims[~np.eye(n, dtype=bool)] if n > 1 else sims.ravel()
    lo, hi = fitted_limits(off, bounds=(-1.0, 1.0))
    im = ax.imshow(sims, cmap="viridis", vmin=lo, vmax=hi, extent=(0.5, n + 0.5, n + 0.5, 0.5))
    plt.colorbar(im, ax=ax, label="cosine")
    for axis in (ax.xaxis, ax.yaxis):
        integer_axis(axis, range(1, n + 1))
    ax.set_xlabel(label)
    ax.set_ylabel(label)
    ax.set_title(title or "pairwise cosine")
    return ax


def plot_mask_row(row: torch.Tensor, segments: torch.Tensor, query: int, ax=None):
    """One query's mask row as a strip: each key it may attend coloured by the key's segment, blocked = white."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 1.2))
    seg = segments.cpu()
    img = np.where(row.bool().cpu().numpy(), seg.numpy(), -1)[None]
    ax.imshow(img + 1, cmap=_part_cmap(), vmin=0, vmax=len(PART_NAMES), aspect="auto", interpolation="nearest")
    for _, a, _ in segment_runs(seg):
        ax.axvline(a - 0.5, color="black", lw=0.4)
    ax.axvline(query, color="black", lw=1.5, ls="--")
    ax.set_yticks([])
    ax.set_xlabel("key position")
    ax.set_title(f"keys query {query} ({PART_NAMES[int(seg[query])]}) may attend", fontsize=9)
    return ax


def plot_images(paths: Sequence[str | Path], titles: Sequence[str] = (), fig=None):
    """A row of images (e.g. a record's question and thought images) with titles."""
    from PIL import Image

    fig = fig or plt.figure(figsize=(3 * len(paths), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(paths)))
    for i, (ax, path) in enumerate(zip(axes, paths)):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(titles[i] if i < len(titles) else Path(path).name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_bars(groups: dict[str, dict[str, float | None]], title: str = "", ylabel: str = "", log: bool = False,
              ax=None):
    """Grouped bars: {group: {label: value}} (None values are left out), e.g. the bottleneck check per K."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    labels = list(dict.fromkeys(lab for g in groups.values() for lab in g))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(labels))
    positive = [v for g in groups.values() for v in g.values() if v]
    floor = min(positive) / 100 if log and positive else 0.0
    for i, (name, vals) in enumerate(groups.items()):
        xs = x + (i - (len(groups) - 1) / 2) * width
        ys = [vals.get(lab) for lab in labels]
        bars = ax.bar(xs, [np.nan if y is None or (log and y == 0) else y for y in ys], width, label=name)
        for xi, y in zip(xs, ys):
            if log and y == 0:  # log axes cannot show 0: say it
                ax.text(xi, floor, "0", ha="center", va="bottom", fontsize=9, color=bars.patches[0].get_facecolor())
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
        if positive:
            ax.set_ylim(bottom=floor)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_norms(norms: torch.Tensor, title: str = "", ax=None):
    """(N, K) vector norms per latent position: one thin line per record, the mean in black."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    pos = np.arange(1, norms.shape[1] + 1)
    for r in norms.numpy():
        ax.plot(pos, r, color="grey", lw=0.5, alpha=0.5)
    ax.plot(pos, norms.mean(0).numpy(), color="black", lw=2, marker="o", label="mean over records")
    set_value_axis(ax, norms.numpy())
    return _per_position_axes(ax, "L2 norm", title or "teacher latent norms", 8, norms.shape[1])


def _per_position_axes(ax, ylabel: str, title: str, legend_size: int, num_positions: int):
    """Labels of a plot over latent positions (ticks 1..K)."""
    ax.set_xlabel("latent position")
    integer_axis(ax.xaxis, range(1, num_positions + 1))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return ax


def plot_accuracy(grid: dict[str, dict[int, float]], baseline: float | None = None, title: str = "", ax=None):
    """Accuracy against K for each model (stage); an optional horizontal baseline."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, row in grid.items():
        ks = sorted(row)
        ax.plot(ks, [row[k] for k in ks], marker="o", label=name)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label="majority answer")
    ax.set_xlabel("K (latent slots at inference)")
    integer_axis(ax.xaxis, sorted({k for row in grid.values() for k in row}), max_ticks=64)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title or "accuracy without thought images")
    ax.legend(fontsize=8)
    return ax


def save(fig_or_ax, path: str | Path) -> Path:
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
