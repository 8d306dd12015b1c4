"""The testbed: the hops task, the visual-CoT and pause controls, K=0, the fast collator cache,
causal-use checks, the probe, and the gradient modes; each against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.loss import align_loss
from lcot.core.mask import Seg, build_mask
from lcot.core.model import latent_hidden_states
from lcot.lab.probe import probe_accuracy, probe_grid
from lcot.pipeline.data import read_records
from lcot.toy import hops
from lcot.toy.synthetic import generate


@pytest.fixture(scope="module")
def hops_dir(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("hops") / "data", n=40, seed=1, task="hops")["train"].parent


@pytest.fixture(scope="module")
def hops_records(hops_dir):
    return read_records(hops_dir / "train.jsonl")


def run(model, b, **kw):
    return latent_hidden_states(model, b, **kw)


# -- the hops task ------------------------------------------------------------------------------------------
def _framed(img) -> int:
    """Index of the cell whose corner pixel is white (the frame), read off the pixels."""
    cols = img.width // hops.CELL
    found = [i for i in range(cols * (img.height // hops.CELL))
             if img.getpixel(((i % cols) * hops.CELL, (i // cols) * hops.CELL)) == hops.WHITE]
    assert len(found) == 1
    return found[0]


def _colours(img, cell: int, cols: int) -> tuple[str, str]:
    """(top, bottom) colour names of a cell, read off its pixels."""
    x, y = (cell % cols) * hops.CELL + hops.CELL // 2, (cell // cols) * hops.CELL
    name = {v: k for k, v in hops.COLOURS.items()}
    return name[img.getpixel((x, y + hops.CELL // 4))], name[img.getpixel((x, y + 3 * hops.CELL // 4))]


def test_hops_records_follow_the_pointers_drawn_in_the_images(hops_dir):
    from PIL import Image

    lines = [json.loads(x) for x in (hops_dir / "train.jsonl").read_text().splitlines()]
    assert {len(r["states"]) for r in lines} == {1, 2, 3, 4} and all(r["hops"] == len(r["states"]) for r in lines)
    for r in lines:
        q = Image.open(hops_dir / r["question_image_paths"][0]).convert("RGB")
        cols = q.width // hops.CELL
        cell, walked = _framed(q), []
        for _ in range(r["hops"]):  # follow the pointers in the pixels: bottom colour -> the cell with that top
            bottom = _colours(q, cell, cols)[1]
            cell = next(i for i in range(8) if _colours(q, i, cols)[0] == bottom)
            walked.append(cell)
        assert [_colours(q, c, cols)[0] for c in walked] == r["states"]
        assert r["answer"].endswith(f"#### {r['states'][-1]}") and str(r["hops"]) in r["question"]
        frames = [_framed(Image.open(hops_dir / t).convert("RGB")) for t in r["thought_image_paths"]]
        assert frames == walked  # thought image j frames the node reached after j hops


def test_hops_cli_and_difficulty_field(tmp_path, capsys):
    from lcot.toy.synthetic import main

    main(["--task", "hops", "--output_dir", str(tmp_path / "h"), "--n", "10", "--max_hops", "2"])
    assert "train: 8 records" in capsys.readouterr().out
    recs = read_records(tmp_path / "h" / "train.jsonl")
    assert all(r.extra["hops"] in (1, 2) and len(r.thought_images) == r.extra["hops"] for r in recs)
    with pytest.raises(ValueError, match="max_hops"):
        generate(tmp_path / "bad", n=2, task="hops", max_hops=8)


# -- the collator's cache and per-record positions ----------------------------------------------------------
@pytest.mark.parametrize("thought", [False, True])
def test_cached_collator_gives_identical_batches(loaded, hops_records, thought):
    model, processor = loaded
    plain = Collator(processor, model.config, 3, thought_images=thought)
    cached = Collator(processor, model.config, 3, thought_images=thought, cache=True)
    cached.prepare(hops_records[:6], progress=False)
    assert all(e.pixels.dtype == torch.uint8 for e in cached.cache.values())  # exact codes, a quarter of fp32
    from lcot.core.collate import decode_pixels

    for recs in (hops_records[:5], hops_records[2:6]):
        a, b = plain(recs), cached(recs)
        assert b["pixel_values"].dtype == torch.uint8  # the codes travel; the model decodes them
        b["pixel_values"] = decode_pixels(b.pop("pixel_values"), b.pop("pixel_lut"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    model_in = cached(hops_records[:3])
    with torch.no_grad():
        h_codes, _ = run(model, model_in)
        h_plain, _ = run(model, plain(hops_records[:3]))
    assert torch.equal(h_codes, h_plain)


def test_per_record_positions_equal_transformers_rope_on_the_padded_batch(loaded, hops_records, records):
    """Oracle: transformers' get_rope_index over the whole left/right-padded batch (what
    the collator computed before it cached positions per record)."""
    model, processor = loaded
    for recs in (hops_records[:4], records[:3]):
        c = Collator(processor, model.config, 2, thought_images=True)
        b = c(recs)
        is_thought = [t for r in recs for t in [False] * len(r.question_images) + [True] * len(r.thought_images)]
        ref = c._positions(b["input_ids"], b["segments"], b["image_grid_thw"], is_thought)
        assert torch.equal(b["position_ids"], ref)


# -- the visual-CoT mask ------------------------------------------------------------------------------------
def test_visual_cot_shows_thought_images_to_the_answer_only_in_that_mode():
    seg = torch.tensor([[Seg.PROMPT, Seg.THOUGHT_IMAGE, Seg.THOUGHT_IMAGE, Seg.ANSWER, Seg.LATENT, Seg.ANSWER]])
    plain, vcot = build_mask(seg)[0, 0], build_mask(seg, visual_cot=True)[0, 0]
    assert not plain[3, 1] and not plain[5, 2] and plain[4, 1]  # seed rule: latents only
    assert vcot[3, 1] and vcot[5, 2] and vcot[4, 1]  # visual CoT: every later token
    assert torch.equal(plain | vcot, vcot) and torch.equal(vcot, torch.ones(6, 6, dtype=torch.bool).tril())


def test_visual_cot_answer_depends_on_thought_pixels(loaded, hops_records):
    model, processor = loaded
    recs = hops_records[:2]
    outs = []
    for visual_cot in (False, True):
        b = Collator(processor, model.config, 0, thought_images=True, visual_cot=visual_cot)(recs)
        noisy = b["pixel_values"].clone()
        rows = b["image_grid_thw"].prod(-1).tolist()
        start = 0
        for r in recs:  # the thought images follow each record's question image
            start += rows.pop(0)
            n = sum(rows.pop(0) for _ in r.thought_images)
            noisy[start:start + n] += 1.0
            start += n
        with torch.no_grad():
            h0, _ = run(model, b)
            h1, _ = run(model, {**b, "pixel_values": noisy})
        ans = b["segments"] == Seg.ANSWER
        outs.append((h1 - h0).abs()[ans].max().item())
    assert outs[0] == 0.0 and outs[1] > 1e-3  # K=0: only the visual-CoT answer can see the thought images


# -- the pause control and K = 0 ----------------------------------------------------------------------------
def test_pause_control_never_reads_a_fed_back_state(loaded, hops_records):
    """Perturb the last-layer state at the column before the slots (what continuous thought feeds back): the
    continuous model's latents and answer move, the pause model's do not."""
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=False)(hops_records[:3])
    s = b["latent_start"]
    after = torch.zeros_like(b["segments"], dtype=torch.bool)
    after[:, s:] = b["segments"][:, s:] != Seg.PAD

    def perturb(_module, _inputs, out):
        if out.shape[1] > s - 1:  # the pass that holds column s-1 (prefix, or the full parallel pass)
            out = out.clone()
            out[:, s - 1] += 5.0
        return out

    moved = {}
    for feed in ("continuous", "pause"):
        with torch.no_grad():
            h0, l0 = run(model, b, feed=feed)
            handle = model.model.language_model.norm.register_forward_hook(perturb)
            try:
                h1, l1 = run(model, b, feed=feed)
            finally:
                handle.remove()
        moved[feed] = (h1 - h0).abs()[after].max().item()
        if feed == "pause":
            slots = model.get_input_embeddings()(b["input_ids"][:, s:s + 3])
            assert torch.equal(b["input_ids"][:, s:s + 3], torch.full_like(b["input_ids"][:, s:s + 3],
                                                                           b["input_ids"][0, s]))
            assert slots.std(1).max() == 0  # every slot's input is the one learned embedding
    assert moved["pause"] == 0.0 and moved["continuous"] > 1e-3


def test_pause_gradient_reaches_the_pad_embedding_only_through_the_parallel_pass(loaded, hops_records):
    model, processor = loaded
    b = Collator(processor, model.config, 2, thought_images=False)(hops_records[:2])
    emb = model.get_input_embeddings().weight
    pad = processor.tokenizer.convert_tokens_to_ids("<abs_vis_token_pad>")
    out = model(input_ids=b["input_ids"], attention_mask_4d=b["attention_mask_4d"], position_ids=b["position_ids"],
                pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"], labels=b["labels"],
                latent_mode=True, latent_start=b["latent_start"], num_latents=2, feed="pause")
    grad = torch.autograd.grad(out.loss, emb)[0]
    assert grad[pad].abs().sum() > 0  # the pause embedding is learned
    model.zero_grad(set_to_none=True)


# -- gradient modes and the MSE alignment -------------------------------------------------------------------
def test_truncated_gives_ce_no_gradient_into_the_fed_back_states_and_full_does(loaded, hops_records):
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=False)(hops_records[:2])
    s = b["latent_start"]
    grads, values = {}, {}
    for grad in ("full", "truncated"):
        fed = []

        def keep(_m, _i, out, fed=fed):
            if out.shape[1] == 1 and out.requires_grad:  # a single-token latent step's output (full mode)
                out.retain_grad()
                fed.append(out)

        handle = model.model.language_model.norm.register_forward_hook(keep)
        try:
            hidden, lat = run(model, b, grad=grad)
        finally:
            handle.remove()
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, s + 3:]).flatten(0, 1),
                                                 b["input_ids"][:, s + 3:].flatten())  # any CE on the answer side
        loss.backward()
        values[grad] = hidden.detach()
        grads[grad] = [f.grad for f in fed]
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(values["full"], values["truncated"], atol=1e-5, rtol=1e-5)  # same forward
    assert len(grads["full"]) == 3 and all(g is not None and g.abs().sum() > 0 for g in grads["full"][:2])
    assert grads["truncated"] == []  # the chain ran without gradients: nothing to carry CE into the fed states


def test_mse_alignment_is_the_mean_squared_error():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 4, 5, generator=gen)
    loss, cos = align_loss(student, teacher, "mse")
    assert torch.isclose(loss, ((student - teacher[:, :3]) ** 2).mean())
    cosine = torch.nn.functional.cosine_similarity
    ref = torch.stack([cosine(student[:, j], teacher[:, j], dim=-1) for j in range(3)], 1)
    torch.testing.assert_close(cos, ref.mean(0))
    assert torch.isclose(align_loss(student, student.clone(), "mse")[0], torch.tensor(0.0))


# -- the probe ----------------------------------------------------------------------------------------------
def test_probe_recovers_a_planted_linear_signal_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    colours = sorted(hops.COLOURS)
    n, hidden = 400, 32
    states = [[colours[int(i)] for i in torch.randint(0, 8, (3,), generator=gen)] for _ in range(n)]
    proj = torch.randn(8, hidden, generator=gen)
    lat = torch.randn(n, 3, hidden, generator=gen)
    lat[:, 1] += 3 * proj[[colours.index(s[1]) for s in states]]  # latent 2 holds state 2, nothing else does
    grid = probe_grid(lat[:300], states[:300], lat[300:], states[300:])
    assert grid.accuracy[1][1] > 0.95
    assert max(grid.accuracy[0][1], grid.accuracy[1][0], grid.accuracy[2][2]) < 0.3
    assert grid.diagonal()[1] == grid.accuracy[1][1] and "latent 2" in grid.summary()
    assert grid.chance == [max(c.count(v) for v in set(c)) / 100 for c in ([s[i] for s in states[300:]]
                                                                           for i in range(3))]
    y = [s[1] for s in states]
    assert probe_accuracy(lat[:300, 1], y[:300], lat[300:, 1], y[300:]) == grid.accuracy[1][1]


# -- the vision tower without per-image loops --------------------------------------------------------------
def test_precomputed_vision_tensors_equal_transformers_on_mixed_grids(loaded):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    from lcot.fast.vision import vision_kwargs

    vc = loaded[0].config.vision_config
    grids = torch.tensor([[1, 4, 8], [1, 8, 8], [1, 4, 8], [1, 2, 4], [2, 8, 4], [1, 12, 6]])
    kw = vision_kwargs(grids, vc, torch.device("cpu"))
    index, cu_window = get_vision_window_index(grids, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    assert torch.equal(kw["window_index"], index) and torch.equal(kw["cu_window_seqlens"], cu_window)
    assert torch.equal(kw["position_ids"], get_vision_position_ids(grids, vc.spatial_merge_size))
    cu = get_vision_cu_seqlens(grids)
    assert torch.equal(kw["cu_seqlens"], cu) and kw["max_seqlen"] == int((cu[1:] - cu[:-1]).max())


@pytest.mark.parametrize("lengths", [[16, 16, 16], [16, 64, 16, 4, 64]])
def test_packed_attention_equals_attention_per_segment(lengths):
    from lcot.fast.vision import packed_sdpa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(lengths), 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, *lengths]).cumsum(0)
    module = torch.nn.Module()
    out, _ = packed_sdpa(module, q, k, v, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max(lengths))
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                      scale=0.3)
                     for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_k_curriculum_grows_the_bound_in_equal_phases():
    from lcot.pipeline.trainer import sample_k

    total, kmax = 400, 4
    ks = [sample_k(3, step, kmax, total) for step in range(total)]
    for phase in range(kmax):  # phase c (1-based) draws from 1..c and reaches c
        drawn = set(ks[phase * 100:(phase + 1) * 100])
        assert drawn == set(range(1, phase + 2)), (phase, drawn)
    assert [sample_k(3, s, kmax) for s in range(50)] != ks[:50]  # without it: 1..Kmax from the first step


def _param_grads(model, b, grad: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward values and parameter gradients of CE on the answer plus a loss on every latent."""
    model.zero_grad(set_to_none=True)
    s, k = b["latent_start"], b["num_latents"]
    hidden, lat = run(model, b, grad=grad)
    loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, s + k:-1]).flatten(0, 1),
                                             b["input_ids"][:, s + k + 1:].flatten()) + lat.pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return hidden.detach(), grads


@pytest.mark.parametrize("k", [1, 3])
def test_bptt_k_links_is_the_full_gradient_and_bptt_0_the_truncated_one(loaded, hops_records, k):
    """K parallel passes after the truncated one rebuild the whole chain: values and gradients equal 'full'."""
    model, processor = loaded
    b = Collator(processor, model.config, k, thought_images=False)(hops_records[:2])
    h_full, g_full = _param_grads(model, b, "full")
    h_trunc, g_trunc = _param_grads(model, b, "truncated")
    h_k, g_k = _param_grads(model, b, f"bptt:{k}")
    h_0, g_0 = _param_grads(model, b, "bptt:0")
    for h in (h_trunc, h_k, h_0):
        torch.testing.assert_close(h, h_full, atol=1e-5, rtol=1e-5)  # one forward function
    for a, c in zip(g_k, g_full):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
    for a, c in zip(g_0, g_trunc):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    differs = max((a - c).abs().max().item() for a, c in zip(g_trunc, g_full))
    assert differs > 1e-4  # the feedback links carry gradient: without them the gradient is another one
    if k == 3:  # one link of three: between the two
        _, g_1 = _param_grads(model, b, "bptt:1")
        assert 0 < max((a - c).abs().max().item() for a, c in zip(g_1, g_full)) < differs


def test_bptt_mode_is_checked():
    from lcot.core.model import bptt_links

    assert bptt_links("bptt:0") == 0 and bptt_links("bptt:12") == 12 and bptt_links("full") is None
    for bad in ("bptt", "bptt:-1", "bptt:x", "last:2"):
        with pytest.raises(ValueError, match="bptt:M"):
            bptt_links(bad)


# -- step-wise thought visibility ------------------------------------------------------------------------------
@pytest.mark.parametrize("visibility", ["all", "stepwise", "cumulative"])
def test_a_latent_reads_no_thought_image_of_a_later_step(loaded, hops_records, visibility):
    """Noise in the last of four thought images: under "stepwise" and "cumulative" latents 1..3 stay as they were
    (they cannot read step 4) and latent 4 moves; under "all" latent 1 already moves."""
    model, processor = loaded
    rec = next(r for r in hops_records if len(r.thought_images) == 4)
    b = Collator(processor, model.config, 4, thought_images=True, visibility=visibility)([rec])
    last = int(b["image_grid_thw"][-1].prod())  # the last image's rows come last in pixel_values
    noisy = dict(b, pixel_values=b["pixel_values"].clone())
    noisy["pixel_values"][-last:] = torch.randn(last, b["pixel_values"].shape[1], generator=torch.Generator()
                                                .manual_seed(0))
    with torch.no_grad():
        _, clean = latent_hidden_states(model, b)
        _, moved = latent_hidden_states(model, noisy)
    change = (moved - clean).abs().amax(-1)[0]  # per latent slot
    assert change[3] > 1e-3
    if visibility == "all":
        assert change[0] > 1e-3
    else:
        assert change[:3].max() < 1e-6, change
