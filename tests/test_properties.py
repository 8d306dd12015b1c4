"""Property-based tests (hypothesis): random records, random K and image counts through the collator and mask.

Invariants checked on every drawn batch:
  - the 4D mask equals a slow per-element reference of the documented rule;
  - labels sit exactly on ANSWER tokens and decode to `<abs_vis_token></abs_vis_token>\\n{answer}<|im_end|>`;
  - the K latent slots occupy the same columns in every row, framed by <abs_vis_token> ... </abs_vis_token>;
  - positions of every non-thought token are the same with and without the thought images, and a
    batched row equals the record collated alone (padding changes nothing);
  - text positions increase by one along the row, image token counts match the image grids;
  - drop_latents(batch of K, k) equals the batch collated with k.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lcot.core.collate import Collator, drop_latents
from lcot.core.mask import Seg, build_mask
from lcot.core.tokens import IGNORE, LATENT_END, LATENT_START
from lcot.pipeline.data import CONTROL_TOKENS, parse_record

SIZES_MODES = [((56, 56), "RGB"), ((112, 56), "RGBA"), ((56, 112), "L"), ((84, 84), "P"), ((140, 56), "RGB"),
               ((60, 90), "RGB")]
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prop_images")
    for i, (size, mode) in enumerate(SIZES_MODES):
        im = Image.new("RGB", size, (40 * i, 255 - 30 * i, 90))
        im.paste((200, 10, 10), (3, 3, size[0] // 2, size[1] // 3))
        (im.convert(mode) if mode != "P" else im.convert("P", palette=Image.Palette.ADAPTIVE)).save(d / f"im{i}.png")
    return d


def clean(text: str) -> str:
    """Without control tokens (read_records refuses them); removing one may join the halves of another."""
    while any(tok in text for tok in CONTROL_TOKENS):
        for tok in CONTROL_TOKENS:
            text = text.replace(tok, "")
    return text


texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30).map(clean)
finals = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).map(
    lambda s: clean(s).replace("####", "").strip()).filter(bool)
image_lists = st.lists(st.integers(0, len(SIZES_MODES) - 1), max_size=3)


@st.composite
def raw_records(draw) -> dict:
    return {"question": draw(texts), "answer": draw(texts) + " #### " + draw(finals),
            "question_image_paths": [f"im{i}.png" for i in draw(image_lists)],
            "thought_image_paths": [f"im{i}.png" for i in draw(image_lists)]}


batches = st.lists(raw_records(), min_size=1, max_size=4)


def records_of(raw: list[dict], root: Path) -> list:
    return [parse_record(json.loads(json.dumps(r)), i, f"rec:{i}", root) for i, r in enumerate(raw)]


def reference_mask(segments: list[int]) -> list[list[bool]]:
    """The documented rule, one element at a time."""
    n = len(segments)
    out = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(n):
            if q == k:
                out[q][k] = True  # every row attends itself (a padding row only itself)
            elif k < q and segments[k] != Seg.PAD:
                out[q][k] = segments[k] != Seg.THOUGHT_IMAGE or segments[q] in (Seg.LATENT, Seg.THOUGHT_IMAGE)
    return out


def n_tokens(grid: torch.Tensor) -> int:
    return int(grid.prod()) // 4  # spatial merge 2x2


@SETTINGS
@given(raw=batches, k=st.integers(0, 6), thought=st.booleans())
def test_mask_labels_and_latent_columns(loaded, images, raw, k, thought):
    model, processor = loaded
    tok = processor.tokenizer
    records = records_of(raw, images)
    b = Collator(processor, model.config, k, thought_images=thought)(records)
    seg, ids, labels, s = b["segments"], b["input_ids"], b["labels"], b["latent_start"]
    latent_start, latent_end, latent_pad = (tok.convert_tokens_to_ids(t) for t in
                                            (LATENT_START, LATENT_END, "<abs_vis_token_pad>"))
    # the mask: exactly the rule
    mask = b["attention_mask_4d"]
    assert mask.shape == (len(records), 1, seg.shape[1], seg.shape[1]) and mask.dtype == torch.bool
    for i in range(len(records)):
        assert mask[i, 0].tolist() == reference_mask(seg[i].tolist())
    # latent slots: the same K columns in every row, framed by the start and end tokens
    assert b["num_latents"] == k
    assert (seg[:, s:s + k] == Seg.LATENT).all() and (ids[:, s:s + k] == latent_pad).all()
    assert int((seg == Seg.LATENT).sum()) == k * len(records)
    assert (ids[:, s - 1] == latent_start).all() and (ids[:, s + k] == latent_end).all()
    # labels: on ANSWER tokens only, decoding to the answer format
    assert torch.equal(labels != IGNORE, seg == Seg.ANSWER)
    assert torch.equal(labels[seg == Seg.ANSWER], ids[seg == Seg.ANSWER])
    for i, r in enumerate(records):
        text = tok.decode(labels[i][labels[i] != IGNORE])
        assert text == unicodedata.normalize("NFC", f"{LATENT_START}{LATENT_END}\n{r.final_answer}<|im_end|>")
    # images: token counts follow the grids, thought images only where asked
    grids = list(b["image_grid_thw"]) if b["image_grid_thw"] is not None else []
    g = 0
    for i, r in enumerate(records):
        nq, nt = len(r.question_images), len(r.thought_images) if thought else 0
        q_tokens = sum(n_tokens(x) + 2 for x in grids[g:g + nq])
        t_tokens = sum(n_tokens(x) + 2 for x in grids[g + nq:g + nq + nt])
        g += nq + nt
        assert int((seg[i] == Seg.QUESTION_IMAGE).sum()) == q_tokens
        assert int((seg[i] == Seg.THOUGHT_IMAGE).sum()) == t_tokens
    assert g == len(grids)
    if grids:
        assert b["pixel_values"].shape[0] == sum(int(x.prod()) for x in grids)


@SETTINGS
@given(raw=batches, k=st.integers(0, 6), data=st.data())
def test_positions_are_invariant_to_thought_images_padding_and_k(loaded, images, raw, k, data):
    model, processor = loaded
    records = records_of(raw, images)
    teacher = Collator(processor, model.config, k, thought_images=True)(records)
    student = Collator(processor, model.config, k, thought_images=False)(records)
    st_, ss = teacher["latent_start"], student["latent_start"]
    for i in range(len(records)):
        keep_t = (teacher["segments"][i] != Seg.THOUGHT_IMAGE) & (teacher["segments"][i] != Seg.PAD)
        keep_s = student["segments"][i] != Seg.PAD
        assert torch.equal(teacher["input_ids"][i, keep_t], student["input_ids"][i, keep_s])
        assert torch.equal(teacher["position_ids"][:, i, keep_t], student["position_ids"][:, i, keep_s])
        # text tokens: t == h == w, and one more than the token before (images may sit in between)
        pos, seg = student["position_ids"][:, i], student["segments"][i]
        text = (seg != Seg.PAD) & (seg != Seg.QUESTION_IMAGE)
        assert (pos[0, text] == pos[1, text]).all() and (pos[1, text] == pos[2, text]).all()
        assert (pos[0, text].diff() >= 1).all()
        slots = pos[0, ss - 1:ss + k + 1]
        assert torch.equal(slots, slots[0] + torch.arange(k + 2))
    # the latent slots sit at the same positions for teacher (thought images shown) and student
    assert torch.equal(teacher["position_ids"][:, :, st_:st_ + k], student["position_ids"][:, :, ss:ss + k])
    # a batched row is the record alone, left/right padded
    for i, r in enumerate(records):
        one = Collator(processor, model.config, k, thought_images=True)([r])
        valid = teacher["segments"][i] != Seg.PAD
        assert int(valid.sum()) == one["input_ids"].shape[1]
        for key in ("input_ids", "segments", "labels"):
            assert torch.equal(teacher[key][i, valid], one[key][0])
        assert torch.equal(teacher["position_ids"][:, i, valid], one["position_ids"][:, 0])
        sub = teacher["attention_mask_4d"][i, 0][valid][:, valid]
        assert torch.equal(sub, one["attention_mask_4d"][0, 0])
    # fewer latents by dropping columns == collating with fewer
    k2 = data.draw(st.integers(0, k), label="k2")
    fewer = Collator(processor, model.config, k2, thought_images=False)(records)
    dropped = drop_latents(student, k2)
    for key in ("input_ids", "attention_mask", "segments", "labels", "position_ids", "attention_mask_4d"):
        assert torch.equal(dropped[key], fewer[key]), key
    assert dropped["num_latents"] == k2 and dropped["latent_start"] == fewer["latent_start"]


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(st.lists(st.sampled_from(list(Seg)), min_size=1, max_size=24), min_size=1, max_size=3))
def test_mask_rule_on_arbitrary_segment_sequences(segments):
    """Any labelling (not only what the collator writes): the builder equals the per-element rule."""
    length = max(len(s) for s in segments)
    rows = [s + [Seg.PAD] * (length - len(s)) for s in segments]
    mask = build_mask(torch.tensor([[int(x) for x in r] for r in rows]))
    for i, r in enumerate(rows):
        assert mask[i, 0].tolist() == reference_mask([int(x) for x in r])
        assert mask[i, 0].any(dim=1).all()  # no empty row (eager attention would give NaN)


def reference_visibility(segments: list[int], steps: list[int], visibility: str, visual_cot: bool) -> list[list[bool]]:
    """Which thought image each latent slot (and thought image) sees, one element at a time."""
    n, last = len(segments), max([s for s, g in zip(steps, segments) if g == Seg.THOUGHT_IMAGE], default=0)
    first = next((i for i, g in enumerate(segments) if g == Seg.LATENT), n)  # <abs_vis_token> is before it
    out = [[False] * n for _ in range(n)]
    for q in range(n):
        for k in range(n):
            if q == k:
                out[q][k] = True
            elif k < q and segments[k] != Seg.PAD:
                if segments[k] != Seg.THOUGHT_IMAGE:
                    out[q][k] = True
                elif segments[q] in (Seg.LATENT, Seg.THOUGHT_IMAGE):
                    want = {"all": True, "stepwise": steps[k] == min(steps[q], last),
                            "cumulative": steps[k] <= steps[q]}[visibility]
                    out[q][k] = want
                else:
                    out[q][k] = visual_cot and (visibility == "all" or q >= first)
    return out


@settings(max_examples=60, deadline=None)
@given(images=st.lists(st.integers(1, 3), min_size=0, max_size=4), k=st.integers(0, 5),
       visibility=st.sampled_from(["all", "stepwise", "cumulative"]), visual_cot=st.booleans())
def test_thought_visibility_equals_the_per_element_rule(images, k, visibility, visual_cot):
    """A prompt, thought images of random sizes, K slots and an answer: build_mask with the collator's steps equals
    the rule; under "stepwise" slot j reads image min(j, T) and nothing of any other."""
    from lcot.core.collate import step_indices

    segs, ids = [Seg.PROMPT] * 2, [7, 7]
    for size in images:  # <|vision_start|> (id 1), pads, <|vision_end|>
        segs += [Seg.THOUGHT_IMAGE] * (size + 2)
        ids += [1] + [2] * size + [3]
    segs += [Seg.ANSWER] + [Seg.LATENT] * k + [Seg.ANSWER] * 2
    ids += [4] + [5] * k + [6, 6]
    seg_t, ids_t = torch.tensor([[int(s) for s in segs]]), torch.tensor([ids])
    steps = step_indices(ids_t, seg_t, vision_start=1)
    image_of = [i for i, size in enumerate(images, 1) for _ in range(size + 2)]
    assert steps[0, 2:2 + len(image_of)].tolist() == image_of
    assert steps[0, seg_t[0] == Seg.LATENT].tolist() == list(range(1, k + 1))
    mask = build_mask(seg_t, visual_cot, steps, visibility)[0, 0]
    assert mask.tolist() == reference_visibility([int(s) for s in segs], steps[0].tolist(), visibility, visual_cot)
    if visibility == "all":
        assert torch.equal(mask, build_mask(seg_t, visual_cot)[0, 0])
    if visibility == "stepwise" and images and k:
        latent_rows = (seg_t[0] == Seg.LATENT).nonzero()[:, 0]
        thought = seg_t[0] == Seg.THOUGHT_IMAGE
        for j, row in enumerate(latent_rows.tolist(), 1):
            seen = set(steps[0, thought & mask[row]].tolist())
            assert seen == {min(j, len(images))}
