"""Figures: the 4D mask with named blocks, loss curves, latent-teacher cosine per position over training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.ticker import MaxNLocator

from lcot.core.mask import SEGMENT_NAMES, Seg

SEG_COLORS = {Seg.PAD: "#dddddd", Seg.PROMPT: "#4c72b0", Seg.QUESTION_IMAGE: "#55a868", Seg.THOUGHT_IMAGE: "#c44e52",
              Seg.LATENT: "#8172b2", Seg.ANSWER: "#ccb974"}


def segment_runs(segments: torch.Tensor) -> list[tuple[Seg, int, int]]:
    """[(segment, start, stop)] runs of one row of segment labels."""
    s = segments.tolist()
    runs, start = [], 0
    for i in range(1, len(s) + 1):
        if i == len(s) or s[i] != s[start]:
            runs.append((Seg(s[start]), start, i))
            start = i
    return runs


def plot_mask(mask: torch.Tensor, segments: torch.Tensor, title: str = "", ax=None, highlight: int | None = None):
    """Draw one (L, L) mask: each allowed cell coloured by the key's segment, blocks named on the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6.5))
    m, seg = mask.bool().cpu(), segments.cpu()
    img = np.where(m.numpy(), seg[None, :].expand_as(m).numpy(), -1)
    cmap = ListedColormap(["white"] + [SEG_COLORS[s] for s in Seg])
    ax.imshow(img + 1, cmap=cmap, vmin=0, vmax=len(Seg), interpolation="nearest")
    for s, a, b in segment_runs(seg):
        for f in (ax.axhline, ax.axvline):
            f(a - 0.5, color="black", lw=0.4)
        if b - a >= max(2, len(seg) // 60):
            ax.text(len(seg) + 1, (a + b) / 2, SEGMENT_NAMES[s], va="center", fontsize=7, color=SEG_COLORS[s])
    if highlight is not None:
        ax.axhline(highlight, color="black", lw=1.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=SEG_COLORS[s]) for s in Seg]
    ax.legend(handles, [SEGMENT_NAMES[s] for s in Seg], fontsize=7, loc="upper center", title="key segment",
              title_fontsize=7, bbox_to_anchor=(0.5, -0.09), ncol=len(Seg), frameon=False)
    ax.set_xlabel("key (attended) position")
    ax.set_ylabel("query position")
    ax.set_title(title or "4D attention mask (white = blocked)")
    return ax


def plot_losses(rows: Sequence[dict], title: str = "", ax=None):
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce", "align"):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            ax.plot(steps, [np.nan if v is None else v for v in vals], marker=".", label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.legend()
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
    lo, hi = float(np.nanmin(mat)), float(np.nanmax(mat))  # the data's range: cosines often sit near 1
    im = ax1.imshow(mat.T, aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6),
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, 0.5, mat.shape[1] + 0.5))
    fig.colorbar(im, ax=ax1, label="cosine")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("latent position")
    picks = sorted({0, mat.shape[1] // 2, mat.shape[1] - 1})
    for j in picks:
        ax2.plot(steps, mat[:, j], marker=".", label=f"position {j + 1}")
    ax2.plot(steps, np.nanmean(mat, 1), color="black", lw=2, label="mean")
    ax2.set_xlabel("optimizer step")
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
    return _per_position_axes(ax, "cosine to teacher", title or "latent-teacher cosine vs K", legend_size=7)


def plot_similarity(latents: torch.Tensor, title: str = "", ax=None):
    """Pairwise cosine of vectors (rows): collapse of teacher latents shows up as an all-yellow matrix."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    x = torch.nn.functional.normalize(latents.float(), dim=-1)
    im = ax.imshow((x @ x.T).numpy(), cmap="viridis", vmin=-1, vmax=1)
    plt.colorbar(im, ax=ax)
    ax.set_title(title or "pairwise cosine")
    return ax


def plot_mask_row(row: torch.Tensor, segments: torch.Tensor, query: int, ax=None):
    """One query's mask row as a strip: each key it may attend coloured by the key's segment, blocked = white."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 1.2))
    seg = segments.cpu()
    img = np.where(row.bool().cpu().numpy(), seg.numpy(), -1)[None]
    cmap = ListedColormap(["white"] + [SEG_COLORS[s] for s in Seg])
    ax.imshow(img + 1, cmap=cmap, vmin=0, vmax=len(Seg), aspect="auto", interpolation="nearest")
    for _, a, _ in segment_runs(seg):
        ax.axvline(a - 0.5, color="black", lw=0.4)
    ax.axvline(query, color="black", lw=1.5, ls="--")
    ax.set_yticks([])
    ax.set_xlabel("key position")
    ax.set_title(f"keys query {query} ({SEGMENT_NAMES[Seg(int(seg[query]))]}) may attend", fontsize=9)
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
    return _per_position_axes(ax, "L2 norm", title or "teacher latent norms", legend_size=8)


def _per_position_axes(ax, ylabel: str, title: str, legend_size: int):
    """Labels of a plot over latent positions (whole numbers on the x axis)."""
    ax.set_xlabel("latent position")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
