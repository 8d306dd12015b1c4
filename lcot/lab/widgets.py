"""The interactive 4D-mask viewer (ipywidgets) and the token rendering the notebooks share.

    viewer = MaskViewer(processor, model.config, records, num_latents=4)
    viewer          # in a notebook: controls, the mask, the query's row, the sequence

Choose the sample, the stage and K, toggle the thought images, and click a query token in the list:
the figure shows the whole mask (the query's row marked) and the row alone, and the sequence below
shows which keys the query may attend (coloured) and which it may not (struck through). Every batch
comes from `lcot.core.collate.Collator`, so the mask is `lcot.core.mask.build_mask`'s, as in training.

Without a browser (tests), drive it through its widgets (`viewer.num_latents.value = 2`, `viewer.query.value = 17`)
and read `viewer.batch`, `viewer.row` and `viewer.visible_by_segment()`.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch

from lcot.core.collate import Collator
from lcot.core.mask import Seg
from lcot.core.record import Record
from lcot.core.tokens import IGNORE, TokenIds
from lcot.lab.plots import SEG_COLORS, plot_mask, plot_mask_row, segment_runs
from lcot.lab.segments import PART_NAMES, PARTS, display_segments

# What each stage's batches hold (stage3 and inference differ in the answer: given vs. to be generated).
STAGES: dict[str, dict] = {
    "stage1 (format warm-up)": dict(question_images=False, thought_images=False, with_answer=True),
    "stage2 / teacher": dict(question_images=True, thought_images=True, with_answer=True),
    "stage3": dict(question_images=True, thought_images=False, with_answer=True),
    "inference": dict(question_images=True, thought_images=False, with_answer=False),
}
IMAGE_SEGMENTS = (Seg.QUESTION_IMAGE, Seg.THOUGHT_IMAGE)


def stage_collator(processor, config, stage: str, num_latents: int, thought_images: bool | None = None,
                   reserve: int = 4) -> Collator:
    """The collator of a stage of `STAGES` (thought_images=None: the stage's own setting)."""
    st = STAGES[stage]
    thought = st["thought_images"] if thought_images is None else thought_images
    return Collator(processor, config, num_latents, thought_images=thought, question_images=st["question_images"],
                    with_answer=st["with_answer"], reserve=reserve)


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable string per token id (special tokens as written, newline as a visible mark)."""
    return [tokenizer.decode([i]).replace("\n", "\u23ce") for i in ids]


def _span(text: str, seg: Seg, style: str = "", title: str = "") -> str:
    color = SEG_COLORS[seg]
    return (f'<span title="{html.escape(title)}" style="background:{color}33;border-bottom:2px solid {color};'
            f'padding:0 1px;margin:0 1px;white-space:pre;{style}">{html.escape(text)}</span>')


def _image_runs(runs, ids: list[int], vision_start: int):
    """Segment runs with image runs split per image (adjacent thought images form one segment run)."""
    for s, a, b in runs:
        if s not in IMAGE_SEGMENTS:
            yield s, a, b
            continue
        starts = [p for p in range(a, b) if ids[p] == vision_start] or [a]
        for lo, hi in zip(starts, [*starts[1:], b]):
            yield s, lo, hi


def sequence_html(batch: dict, tokenizer, row: int = 0, labels: bool = False, query: int | None = None,
                  allowed: torch.Tensor | None = None, collapse_images: bool = True) -> str:
    """The collated sequence as HTML: tokens tinted by segment (image tokens folded into one chip each).

    labels=True marks the labelled tokens (CE targets) in bold with a frame. With `query` and its mask row
    `allowed`, the keys it may not attend are greyed and struck through, and the query is outlined.
    """
    ids = batch["input_ids"][row].tolist()
    seg = display_segments(batch)[row].cpu()
    lab = batch["labels"][row].tolist()
    texts = token_texts(tokenizer, ids)
    vis = allowed.bool().tolist() if allowed is not None else None
    parts = []
    for s, a, b in _image_runs(segment_runs(seg), ids, TokenIds.from_tokenizer(tokenizer).vision_start):
        if s == Seg.PAD:
            parts.append(_span(f"[padding \u00d7{b - a}]", s, "color:#999", f"{a}-{b - 1}: padding"))
            continue
        if collapse_images and s in IMAGE_SEGMENTS:
            n_vis = sum(vis[a:b]) if vis is not None else None
            text = f"[{PART_NAMES[s]} \u00d7{b - a}" + (f", {n_vis} visible" if vis is not None else "") + "]"
            style = "opacity:0.35;text-decoration:line-through;" if vis is not None and n_vis == 0 else ""
            if query is not None and a <= query < b:
                style += "outline:2px solid black;"
            parts.append(_span(text, s, style, f"{a}-{b - 1}: {PART_NAMES[s]}"))
            continue
        for p in range(a, b):
            style = ""
            if labels and lab[p] != IGNORE:
                style += "font-weight:bold;outline:1px solid #333;"
            if vis is not None and not vis[p]:
                style += "opacity:0.35;text-decoration:line-through;"
            if p == query:
                style += "outline:2px solid black;"
            parts.append(_span(texts[p], s, style, f"{p}: {PART_NAMES[s]}" + (" (labelled)" if lab[p] != IGNORE
                                                                                    else "")))
    legend = " ".join(_span(PART_NAMES[s], s) for s in PARTS)
    note = " &nbsp; <b>bold, framed</b> = labelled (CE target)" if labels else ""
    if vis is not None:
        note += " &nbsp; <s>struck</s> = the query may not attend"
    return (f'<div style="font-family:monospace;font-size:12px;line-height:1.9">{"".join(parts)}</div>'
            f'<div style="font-size:11px">{legend}{note}</div>')


class MaskViewer(widgets.VBox):
    """ipywidgets viewer of the 4D mask of one collated record (see the module docstring)."""

    def __init__(self, processor, config, records: Sequence[Record], num_latents: int = 4, max_latents: int = 8,
                 stage: str = "stage2 / teacher", reserve: int = 4, plot: bool = True) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {stage!r}")
        self.processor, self.config, self.records = processor, config, list(records)
        self.reserve, self.plot = reserve, plot
        self.batch: dict = {}
        self._busy = False
        wide = widgets.Layout(width="98%")
        self.sample = widgets.Dropdown(options=[(f"record {r.idx}: {r.question}", i) for i, r in enumerate(records)],
                                       value=0, description="sample", layout=wide)
        self.stage = widgets.Dropdown(options=list(STAGES), value=stage, description="stage")
        self.num_latents = widgets.IntSlider(value=num_latents, min=0, max=max(max_latents, num_latents),
                                             description="K")
        self.thought = widgets.Checkbox(value=STAGES[stage]["thought_images"], description="thought images",
                                        tooltip="show the thought images (visible to the latent slots only)")
        self.query = widgets.Select(options=[], rows=16, description="query",
                                    layout=widgets.Layout(width="40%"))
        self.summary = widgets.HTML()
        self.sequence = widgets.HTML()
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="60%"))
        self.stage.observe(self._on_stage, names="value")
        for w in (self.sample, self.num_latents, self.thought):
            w.observe(self._on_settings, names="value")
        self.query.observe(self._on_query, names="value")
        super().__init__([self.sample, widgets.HBox([self.stage, self.num_latents, self.thought]),
                          widgets.HBox([self.query, self.image]), self.summary, self.sequence])
        self._rebuild()

    # -- state -------------------------------------------------------------------------------------
    @property
    def segments(self) -> torch.Tensor:
        return self.batch["segments"][0]

    @property
    def parts(self) -> torch.Tensor:
        """(L,) display parts of the sequence: its segments, with the latent delimiters as "latent markers"."""
        return display_segments(self.batch)[0]

    @property
    def row(self) -> torch.Tensor:
        """(L,) bool: the keys the selected query may attend (its row of the batch's 4D mask)."""
        return self.batch["attention_mask_4d"][0, 0, self.query.value]

    def collate(self) -> dict:
        """The batch of the current sample, stage, K and thought-image setting."""
        c = stage_collator(self.processor, self.config, self.stage.value, self.num_latents.value, self.thought.value,
                           self.reserve)
        return c([self.records[self.sample.value]])

    def visible_by_segment(self) -> dict[str, tuple[int, int]]:
        """{key part: (keys the query may attend, keys at or before the query)} (display parts)."""
        q, seg, row = self.query.value, self.parts, self.row
        out = {}
        for s in PARTS:
            earlier = int((seg[: q + 1] == s).sum())
            if earlier:
                out[PART_NAMES[s]] = (int((row & (seg == s)).sum()), earlier)
        return out

    def _default_query(self) -> int:
        seg = self.segments
        for s in (Seg.LATENT, Seg.ANSWER):
            hits = (seg == s).nonzero()
            if len(hits):
                return int(hits[0])
        return int((seg != Seg.PAD).nonzero()[-1])

    # -- callbacks -----------------------------------------------------------------------------------
    def _on_stage(self, change=None) -> None:
        self._busy = True  # the toggle follows the stage; one rebuild for both
        self.thought.value = STAGES[self.stage.value]["thought_images"]
        self._busy = False
        self._rebuild()

    def _on_settings(self, change=None) -> None:
        if not self._busy:
            self._rebuild()

    def _on_query(self, change=None) -> None:
        if not self._busy and self.query.value is not None:
            self._redraw()

    def _rebuild(self) -> None:
        """New batch; keep the query on the same kind of token (e.g. the 2nd latent) where it still exists."""
        old = None
        if self.batch and self.query.value is not None:
            seg = self.segments
            s = seg[self.query.value]
            old = (int(s), int((seg[: self.query.value] == s).sum()))
        self.batch = self.collate()
        seg = self.segments
        texts = token_texts(self.processor.tokenizer, self.batch["input_ids"][0].tolist())
        options = [(f"{p:>4}  {PART_NAMES[int(s)]:<14} {t}", p) for p, (s, t) in enumerate(zip(self.parts, texts))
                   if s != Seg.PAD]
        target = self._default_query()
        if old is not None:
            same = (seg == old[0]).nonzero().flatten()
            if len(same) > old[1]:
                target = int(same[old[1]])
        self._busy = True
        self.query.options = options
        self.query.value = target
        self._busy = False
        self._redraw()

    def _redraw(self) -> None:
        q = self.query.value
        self.summary.value = self._summary_html()
        self.sequence.value = sequence_html(self.batch, self.processor.tokenizer, query=q, allowed=self.row)
        if self.plot:  # a PNG in an Image widget: no kernel needed to update it, and it survives export
            fig = self.figure()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=80)
            plt.close(fig)
            self.image.value = buf.getvalue()

    # -- views -----------------------------------------------------------------------------------------
    def figure(self):
        q = self.query.value
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 7.4), gridspec_kw={"height_ratios": [6, 1]})
        shown = "on" if self.thought.value else "off"
        title = f"{self.stage.value}, K={self.num_latents.value}, thought images {shown}"
        plot_mask(self.batch["attention_mask_4d"][0, 0], self.parts, title=title, ax=ax1, highlight=q)
        plot_mask_row(self.row, self.parts, q, ax=ax2)
        fig.tight_layout()
        return fig

    def _summary_html(self) -> str:
        q, seg = self.query.value, self.parts
        tok = token_texts(self.processor.tokenizer, [int(self.batch["input_ids"][0, q])])[0]
        by_name = {name: part for part, name in PART_NAMES.items()}
        cells = "".join(
            f"<tr><td>{_span(name, by_name[name])}</td><td>{v}</td><td>{n}</td>"
            f"<td>{'all' if v == n else 'none' if v == 0 else 'some'}</td></tr>"
            for name, (v, n) in self.visible_by_segment().items())
        head = (f"<b>query {q}</b> {html.escape(tok)} ({PART_NAMES[int(seg[q])]}) may attend "
                f"<b>{int(self.row.sum())}</b> of {q + 1} keys at or before it")
        return (f"<div>{head}</div><table style='font-size:12px'><tr><th>key segment</th><th>visible</th>"
                f"<th>at or before</th><th></th></tr>{cells}</table>")
