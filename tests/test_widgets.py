"""The mask viewer, driven through its widgets as a browser would, against the collator and build_mask."""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.mask import Seg, build_mask
from lcot.core.tokens import IGNORE
from lcot.lab.widgets import STAGES, MaskViewer, sequence_html, stage_collator


@pytest.fixture()
def viewer(loaded, records):
    model, processor = loaded
    return MaskViewer(processor, model.config, records[:3], num_latents=3, max_latents=6, plot=False)


def n_seg(v: MaskViewer, s: Seg) -> int:
    return int((v.segments == s).sum())


def test_every_query_row_is_build_masks_row(viewer):
    assert viewer.stage.value == "stage2 / teacher" and viewer.thought.value
    reference = build_mask(viewer.batch["segments"])[0, 0]
    assert n_seg(viewer, Seg.THOUGHT_IMAGE) > 0
    for _, q in viewer.query.options:  # what clicking each entry of the list shows
        viewer.query.value = q
        assert torch.equal(viewer.row, reference[q])
        visible = viewer.visible_by_segment()
        assert sum(v for v, _ in visible.values()) == int(reference[q].sum())


def test_default_query_is_the_first_latent_and_sees_the_thought_images(viewer):
    q = viewer.query.value
    assert viewer.segments[q] == Seg.LATENT and viewer.segments[q - 1] == Seg.ANSWER  # right after <abs_vis_token>
    thought = viewer.visible_by_segment()["thought image"]
    assert thought == (n_seg(viewer, Seg.THOUGHT_IMAGE),) * 2
    assert "may attend" in viewer.summary.value


def test_answer_query_sees_no_thought_image(viewer):
    viewer.query.value = int((viewer.segments == Seg.ANSWER).nonzero()[-1])
    seen, earlier = viewer.visible_by_segment()["thought image"]
    assert seen == 0 and earlier == n_seg(viewer, Seg.THOUGHT_IMAGE)
    assert "line-through" in viewer.sequence.value


def test_thought_image_toggle_changes_the_sequence(viewer, loaded, records):
    model, processor = loaded
    with_ids = viewer.batch["input_ids"].clone()
    n_thought = n_seg(viewer, Seg.THOUGHT_IMAGE)
    viewer.thought.value = False
    assert n_seg(viewer, Seg.THOUGHT_IMAGE) == 0
    assert viewer.batch["input_ids"].shape[1] == with_ids.shape[1] - n_thought
    expected = Collator(processor, model.config, 3, thought_images=False)([records[0]])
    assert torch.equal(viewer.batch["input_ids"], expected["input_ids"])
    assert viewer.segments[viewer.query.value] == Seg.LATENT  # the query stays on the first latent
    viewer.thought.value = True
    assert torch.equal(viewer.batch["input_ids"], with_ids)


def test_stage_sets_its_images_and_answer(viewer):
    viewer.stage.value = "stage1 (format warm-up)"
    assert not viewer.thought.value  # the toggle follows the stage
    assert n_seg(viewer, Seg.QUESTION_IMAGE) == 0 and n_seg(viewer, Seg.THOUGHT_IMAGE) == 0
    viewer.stage.value = "stage3"
    assert n_seg(viewer, Seg.QUESTION_IMAGE) > 0 and n_seg(viewer, Seg.THOUGHT_IMAGE) == 0
    assert (viewer.batch["labels"] != IGNORE).any()
    viewer.stage.value = "inference"
    assert (viewer.batch["labels"] == IGNORE).all()  # the answer is to be generated
    viewer.stage.value = "stage2 / teacher"
    assert viewer.thought.value and n_seg(viewer, Seg.THOUGHT_IMAGE) > 0


def test_k_slider_and_the_query_follows_its_token(viewer):
    second_latent = int((viewer.segments == Seg.LATENT).nonzero()[1])
    viewer.query.value = second_latent
    viewer.num_latents.value = 5
    assert n_seg(viewer, Seg.LATENT) == 5
    q = viewer.query.value
    assert viewer.segments[q] == Seg.LATENT and int((viewer.segments[:q] == Seg.LATENT).sum()) == 1
    viewer.num_latents.value = 0
    assert n_seg(viewer, Seg.LATENT) == 0
    assert viewer.segments[viewer.query.value] == Seg.ANSWER


def test_sample_choice(viewer, loaded, records):
    model, processor = loaded
    viewer.sample.value = 2
    expected = stage_collator(processor, model.config, "stage2 / teacher", 3)([records[2]])
    assert torch.equal(viewer.batch["input_ids"], expected["input_ids"])
    assert torch.equal(viewer.batch["attention_mask_4d"], expected["attention_mask_4d"])


def test_figure_and_redraw_with_plot(loaded, records):
    import matplotlib.pyplot as plt

    model, processor = loaded
    v = MaskViewer(processor, model.config, records[:1], num_latents=2, plot=True)
    fig = v.figure()
    assert len(fig.axes) >= 2
    plt.close(fig)
    first = bytes(v.image.value)
    assert first.startswith(b"\x89PNG")
    v.query.value = 3  # redraws the figure without a browser
    assert bytes(v.image.value).startswith(b"\x89PNG") and bytes(v.image.value) != first


def test_sequence_html_marks_labels_and_folds_images(loaded, records):
    model, processor = loaded
    b = stage_collator(processor, model.config, "stage2 / teacher", 2)([records[0]])
    page = sequence_html(b, processor.tokenizer, labels=True)
    assert page.count("font-weight:bold") == int((b["labels"][0] != IGNORE).sum())
    n_images = len(records[0].question_images) + len(records[0].thought_images)
    assert page.count("[question image") + page.count("[thought image") == n_images
    assert "<|image_pad|>" not in page


def test_unknown_stage_is_refused(loaded, records):
    model, processor = loaded
    with pytest.raises(ValueError, match="stage must be one of"):
        MaskViewer(processor, model.config, records[:1], stage="stage4")
    assert set(STAGES) == {"stage1 (format warm-up)", "stage2 / teacher", "stage3", "inference"}


# -- the latent delimiters are "latent markers", not answer tokens (display only) --------------------------------
def test_latent_delimiters_are_shown_as_latent_markers(viewer, loaded):
    from lcot.lab.segments import MARKER, display_segments

    _, processor = loaded
    ids = viewer.batch["input_ids"][0]
    parts = display_segments(viewer.batch)[0]
    marker_ids = processor.tokenizer.convert_tokens_to_ids(["<abs_vis_token>", "</abs_vis_token>"])
    assert sorted(ids[parts == MARKER].tolist()) == sorted(marker_ids)
    assert (viewer.batch["segments"][0][parts == MARKER] == Seg.ANSWER).all()  # the mask's labels are unchanged
    q = viewer.query.value  # the first latent
    visible = viewer.visible_by_segment()
    assert visible["latent markers"] == (1, 1) and "answer" not in visible  # it sees <abs_vis_token> only
    viewer.query.value = int((viewer.segments == Seg.ANSWER).nonzero()[-1])
    assert viewer.visible_by_segment()["latent markers"] == (2, 2)
    assert q > 0 and "latent markers" in viewer.summary.value and "latent markers" in viewer.sequence.value


def test_marker_columns_with_k0_and_in_a_padded_batch(loaded, records):
    from lcot.lab.segments import MARKER, display_segments

    model, processor = loaded
    for k in (0, 3):
        b = Collator(processor, model.config, k, thought_images=True)(records[:3])
        parts = display_segments(b)
        ids = processor.tokenizer.convert_tokens_to_ids(["<abs_vis_token>", "</abs_vis_token>"])
        expected = (b["input_ids"] == ids[0]) | (b["input_ids"] == ids[1])
        assert torch.equal(parts == MARKER, expected)
        assert torch.equal(parts[parts != MARKER], b["segments"][parts != MARKER])


def test_access_table_says_latent_markers_not_answer(loaded, records):
    from lcot.lab.analysis import access_table, segment_access
    from lcot.lab.segments import MARKER

    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:1])
    acc = segment_access(b)
    assert acc[(Seg.LATENT, MARKER)] == 1.0 and (Seg.LATENT, Seg.ANSWER) not in acc  # latents never see the answer
    assert acc[(Seg.ANSWER, Seg.LATENT)] == 1.0 and acc[(Seg.ANSWER, Seg.THOUGHT_IMAGE)] == 0.0
    text = access_table(b)
    assert "key: latent markers" in text and "query: latent markers" in text
    latent_row = next(line for line in text.splitlines() if line.startswith("query: latent "))
    header = text.splitlines()[0]
    assert latent_row[header.index("key: answer"):].strip() == "-"


# -- figures: colour ranges, position numbers, spans, integer ticks, twin axis -----------------------------------
def _close(obj):
    import matplotlib.pyplot as plt

    plt.close(getattr(obj, "figure", obj))


def test_similarity_colour_range_is_fitted_and_positions_count_from_one():
    from lcot.lab.plots import plot_similarity

    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 8, generator=gen) + 3.0  # cosines well above -1, below 1
    ax = plot_similarity(lat)
    lo, hi = ax.images[0].get_clim()
    x = torch.nn.functional.normalize(lat, dim=-1)
    sims = (x @ x.T)[~torch.eye(4, dtype=torch.bool)]
    assert lo == pytest.approx(sims.min().item(), abs=1e-6) and hi == pytest.approx(sims.max().item(), abs=1e-6)
    assert lo > -1 + 0.1
    assert list(ax.get_xticks()) == [1, 2, 3, 4] and list(ax.get_yticks()) == [1, 2, 3, 4]
    _close(ax)
    same = plot_similarity(torch.ones(3, 8) + 1e-5 * torch.randn(3, 8, generator=gen))  # collapse
    lo, hi = same.images[0].get_clim()
    assert hi <= 1.0 and hi - lo >= 0.02 - 1e-9  # a flat colour, not noise stretched over the whole map
    _close(same)


def test_value_axes_keep_a_minimum_span():
    from lcot.lab.plots import MIN_SPAN, fitted_limits, plot_cosine_vs_k, plot_norms

    lo, hi = fitted_limits([0.9995, 1.0])  # a 0.05% change
    assert hi - lo == pytest.approx(MIN_SPAN * 1.0)
    assert fitted_limits([0.2, 0.8]) == pytest.approx((0.2, 0.8))  # a real change keeps the data's range
    assert fitted_limits([0.995, 1.0], bounds=(-1, 1))[1] == 1.0
    ax = plot_cosine_vs_k({2: [0.9995, 0.9996], 4: [0.9995, 0.9996, 0.9997, 0.9998]})
    lo, hi = ax.get_ylim()
    assert hi - lo >= MIN_SPAN and list(ax.get_xticks()) == [1, 2, 3, 4]
    _close(ax)
    ax = plot_norms(torch.full((5, 3), 200.0) + torch.arange(5)[:, None] * 0.01)
    lo, hi = ax.get_ylim()
    assert hi - lo >= MIN_SPAN * 200 and list(ax.get_xticks()) == [1, 2, 3]
    _close(ax)


def test_loss_plot_integer_steps_and_alignment_on_its_own_axis():
    from lcot.lab.plots import plot_losses

    rows = [{"step": s, "loss": 2.0 - s / 100, "ce": 2.0 - s / 100, "align": 0.01 - s / 10_000} for s in (1, 2, 3)]
    ax = plot_losses(rows)
    fig = ax.figure
    assert len(fig.axes) == 2  # the twin axis
    right = fig.axes[1]
    assert [ln.get_label() for ln in right.get_lines()] == ["align (right axis)"]
    assert right.get_ylim()[1] < 0.02 and ax.get_ylim()[0] > 1.5
    assert all(float(t).is_integer() for t in ax.get_xticks())
    _close(ax)
    comparable = plot_losses([{"step": s, "loss": 2.0, "ce": 1.0, "align": 1.0} for s in (10, 20)])
    assert len(comparable.figure.axes) == 1  # no twin when the curves share a scale
    _close(comparable)


def test_cosine_heatmap_positions_steps_and_fitted_colours():
    from lcot.lab.plots import plot_cosine

    rows = [{"step": s, "cos_per_position": [0.5 + s / 100, 0.6, 0.7]} for s in (5, 10, 15)]
    fig = plot_cosine(rows)
    heat, curves = fig.axes[0], fig.axes[2]
    assert heat.images[0].get_clim() == pytest.approx((0.55, 0.7))
    assert list(heat.get_yticks()) == [1, 2, 3]
    assert all(float(t).is_integer() for t in heat.get_xticks()) and all(
        float(t).is_integer() for t in curves.get_xticks())
    _close(fig)


def test_accuracy_plot_ticks_only_the_evaluated_ks():
    from lcot.lab.plots import plot_accuracy

    ax = plot_accuracy({"stage3": {0: 0.2, 1: 0.3, 4: 0.4}, "stage2": {0: 0.1, 4: 0.2}}, baseline=0.15)
    assert list(ax.get_xticks()) == [0, 1, 4]
    _close(ax)
