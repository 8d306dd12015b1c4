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
