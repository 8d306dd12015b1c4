"""The core against its oracles: stock Qwen2.5-VL, a naive full recompute, and single-record batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from lcot.core.collate import Collator, drop_latents
from lcot.core.latent import embed_inputs, text_forward
from lcot.core.mask import Seg, build_mask
from lcot.core.model import latent_hidden_states
from lcot.core.tokens import IGNORE, LATENT_END, LATENT_PAD, LATENT_START, add_latent_tokens
from lcot.pipeline.processor import load_processor


def collate(loaded, recs, k, thought, question=True):
    model, processor = loaded
    return Collator(processor, model.config, k, thought_images=thought, question_images=question)(recs)


def run(model, b, grad="full"):
    return latent_hidden_states(model, b, grad=grad)


def naive_latents(model, b):
    """Reference: K+1 full passes without a cache; slot j's input is the output of the column before it."""
    s, k = b["latent_start"], b["num_latents"]
    embeds = embed_inputs(model, b["input_ids"], b["pixel_values"], b["image_grid_thw"])
    length = embeds.shape[1]
    for j in range(k):
        hidden = text_forward(model, embeds, b["attention_mask_4d"], b["position_ids"], slice(0, length))
        embeds = torch.cat([embeds[:, : s + j], hidden[:, s + j - 1: s + j], embeds[:, s + j + 1:]], 1)
    return text_forward(model, embeds, b["attention_mask_4d"], b["position_ids"], slice(0, length))


def valid(b):
    return b["attention_mask"].bool()


# -- 1. oracle: stock Hugging Face Qwen2.5-VL ------------------------------------------------------------
def test_matches_stock_qwen_with_causal_mask(loaded, tiny_dir, records):
    model, _ = loaded
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    add_latent_tokens(load_processor(tiny_dir).tokenizer, stock)  # the same deterministic rows as ours
    ours_sd, stock_sd = model.state_dict(), stock.state_dict()
    assert ours_sd.keys() == stock_sd.keys()
    assert all(torch.equal(ours_sd[k], stock_sd[k]) for k in ours_sd)  # our class loads the checkpoint exactly
    b = collate(loaded, records[:3], k=0, thought=False)
    with torch.no_grad():
        ref = stock(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"]).logits
        hidden, _ = run(model, b)
        ours = model.lm_head(hidden)
        via_4d = model(input_ids=b["input_ids"], attention_mask_4d=b["attention_mask_4d"],
                       position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                       image_grid_thw=b["image_grid_thw"]).logits
    m = valid(b)
    assert ref.abs().max() > 0.1  # real logits, not a degenerate comparison
    torch.testing.assert_close(ours[m], ref[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(via_4d[m], ref[m], atol=1e-5, rtol=1e-5)


def test_eager_attention_with_additive_mask_matches_sdpa(loaded, tiny_dir, records):
    from lcot.pipeline.load import load

    eager, _ = load(tiny_dir, attn_implementation="eager")
    b = collate(loaded, records[:2], k=3, thought=True)
    with torch.no_grad():
        h_sdpa, _ = run(loaded[0], b)
        h_eager, _ = run(eager.eval(), b)
    assert torch.isfinite(h_eager).all()
    torch.testing.assert_close(h_eager[valid(b)], h_sdpa[valid(b)], atol=1e-5, rtol=1e-5)


# -- 2. the mask is honoured end to end ----------------------------------------------------------------
def _perturb_thought_pixels(b):
    out = dict(b)
    pv = b["pixel_values"].clone()
    n_q = int(b["image_grid_thw"][0].prod())  # record 0: one question image first, then thought images
    pv[n_q:] = torch.randn_like(pv[n_q:])
    out["pixel_values"] = pv
    return out


def test_answer_never_sees_thought_images(loaded, records):
    model, _ = loaded
    b = collate(loaded, records[:1], k=0, thought=True)
    with torch.no_grad():
        h0, _ = run(model, b)
        h1, _ = run(model, _perturb_thought_pixels(b))
    answer = b["segments"][0] == Seg.ANSWER
    torch.testing.assert_close(h1[0, answer], h0[0, answer], atol=1e-6, rtol=0)
    thought = b["segments"][0] == Seg.THOUGHT_IMAGE
    assert (h1[0, thought] - h0[0, thought]).abs().max() > 1e-3  # the perturbation is real


def test_latents_do_see_thought_images(loaded, records):
    model, _ = loaded
    b = collate(loaded, records[:1], k=4, thought=True)
    with torch.no_grad():
        _, lat0 = run(model, b)
        _, lat1 = run(model, _perturb_thought_pixels(b))
    assert (lat1 - lat0).abs().max() > 1e-4


# -- 3. cached recurrence == naive recompute, values and gradients ------------------------------------
@pytest.mark.parametrize("thought", [False, True])
def test_cached_recurrence_equals_naive_recompute(loaded, records, thought):
    model, _ = loaded
    b = collate(loaded, records[:2], k=4, thought=thought)
    m = valid(b)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(fn):
        model.zero_grad()
        out = fn()
        (out[m].pow(2).mean() + out[:, b["latent_start"]:].sum() * 1e-3).backward()
        return out.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    cached, g_cached = grads(lambda: run(model, b)[0])
    naive, g_naive = grads(lambda: naive_latents(model, b))
    model.zero_grad()
    torch.testing.assert_close(cached[m], naive[m], atol=1e-5, rtol=1e-5)
    assert sum(g.abs().sum() for g in g_cached) > 0
    for gc, gn in zip(g_cached, g_naive):
        torch.testing.assert_close(gc, gn, atol=1e-5, rtol=1e-4)


def test_truncated_gradient_mode_has_the_same_forward(loaded, records):
    model, _ = loaded
    b = collate(loaded, records[:2], k=4, thought=True)
    with torch.no_grad():
        full, lat_full = run(model, b, "full")
        trunc, lat_trunc = run(model, b, "truncated")
    torch.testing.assert_close(trunc[valid(b)], full[valid(b)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat_trunc, lat_full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast,feed,grad", [("off", "continuous", "full"), ("static", "continuous", "full"),
                                            ("off", "pause", "full"), ("static", "continuous", "truncated")])
def test_latents_without_the_answer_pass(loaded, records, fast, feed, grad, monkeypatch):
    """answer=False (the teacher precompute): the same latents and hidden states up to the last slot, bit for bit;
    the recurrence runs no pass over the answer (a parallel pass still covers every column); refused with
    gradients, whose loss needs the answer."""
    from lcot.fast import Runner

    model, _ = loaded
    b = collate(loaded, records[:2], k=4, thought=True)
    end = b["latent_start"] + 4
    passes, runner = [], Runner(model, fast=fast)
    real_recurrence = runner.recurrence

    def counting(*args):  # the cache and steps, recording the columns of each multi-token pass they run
        steps = real_recurrence(*args)
        real = steps.forward
        monkeypatch.setattr(steps, "forward", lambda x, m, pos, cols: passes.append(cols) or real(x, m, pos, cols))
        return steps

    with torch.no_grad():
        hidden, latents = latent_hidden_states(model, b, grad, feed, runner=runner)
        monkeypatch.setattr(runner, "recurrence", counting)
        short, short_latents = latent_hidden_states(model, b, grad, feed, answer=False, runner=runner)
    assert torch.equal(short_latents, latents) and torch.equal(short, hidden[:, :end])
    assert hidden.shape[1] > end and passes == ([] if feed == "pause" else [slice(0, b["latent_start"])])
    with pytest.raises(ValueError, match="without gradients"):
        latent_hidden_states(model, b, answer=False)


# -- 4. teacher latents with k_max, cut to K, equal those with K -----------------------------------------
def test_kmax_latents_cut_to_k_equal_k_latents(loaded, records):
    model, _ = loaded
    with torch.no_grad():
        _, big = run(model, collate(loaded, records[:2], k=6, thought=True))
        _, small = run(model, collate(loaded, records[:2], k=2, thought=True))
    torch.testing.assert_close(big[:, :2], small, atol=1e-5, rtol=1e-5)
    assert (big[:, 2] - big[:, 1]).abs().max() > 1e-4  # later latents are not copies


def test_drop_latents_equals_collating_with_fewer(loaded, records):
    b6 = collate(loaded, records[:3], k=6, thought=False)
    b2 = collate(loaded, records[:3], k=2, thought=False)
    d = drop_latents(b6, 2)
    for key in ("input_ids", "attention_mask", "segments", "labels", "position_ids", "attention_mask_4d"):
        assert torch.equal(d[key], b2[key]), key


# -- 5. position invariance -----------------------------------------------------------------------------
def test_positions_do_not_depend_on_thought_images(loaded, records):
    with_t = collate(loaded, records[:3], k=4, thought=True)
    without = collate(loaded, records[:3], k=4, thought=False)
    for i in range(3):
        keep_t = (with_t["segments"][i] != Seg.THOUGHT_IMAGE) & (with_t["segments"][i] != Seg.PAD)
        keep_s = without["segments"][i] != Seg.PAD
        assert torch.equal(with_t["input_ids"][i, keep_t], without["input_ids"][i, keep_s])
        assert torch.equal(with_t["position_ids"][:, i, keep_t], without["position_ids"][:, i, keep_s])
    # and the teacher latents sit exactly where the student's are
    s, s0 = with_t["latent_start"], without["latent_start"]
    assert torch.equal(with_t["position_ids"][:, :, s:s + 4], without["position_ids"][:, :, s0:s0 + 4])


# -- 6. batching: a batch of three gives what each gives alone -------------------------------------------
def test_batch_equals_single_records(loaded, records):
    model, _ = loaded
    recs = [records[0], dataclasses.replace(records[1], question="Count them all please, carefully."),
            dataclasses.replace(records[2], question_images=(), thought_images=records[2].thought_images[:1])]
    b = collate(loaded, recs, k=3, thought=True)
    assert len(set(b["attention_mask"].sum(1).tolist())) == 3  # really different lengths
    with torch.no_grad():
        hb, lb = run(model, b)
        for i, r in enumerate(recs):
            one = collate(loaded, [r], k=3, thought=True)
            h1, l1 = run(model, one)
            torch.testing.assert_close(hb[i, valid(b)[i]], h1[0, valid(one)[0]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lb[i], l1[0], atol=1e-5, rtol=1e-5)


# -- 7. labels -----------------------------------------------------------------------------------------
def test_labelled_tokens_decode_to_the_answer_segment(loaded, records):
    _, processor = loaded
    b = collate(loaded, records[:3], k=5, thought=True)
    for i, r in enumerate(records[:3]):
        lab = b["labels"][i]
        text = processor.tokenizer.decode(lab[lab != IGNORE])
        assert text == f"{LATENT_START}{LATENT_END}\n{r.final_answer}<|im_end|>"
        assert (b["input_ids"][i] == processor.tokenizer.convert_tokens_to_ids(LATENT_PAD)).sum() == 5
    assert (b["labels"][b["segments"] != Seg.ANSWER] == IGNORE).all()


def test_collated_sequence_renders_as_designed(loaded, records):
    _, processor = loaded
    r = records[0]
    b = collate(loaded, [r], k=2, thought=True)
    text = processor.tokenizer.decode(b["input_ids"][0])
    n_q = len(r.question_images)
    assert text.count("<|vision_start|>") == n_q + len(r.thought_images)
    user, assistant = text.split("<|im_start|>assistant\n")
    assert user.index("<|vision_start|>") < user.index(r.question)
    assert assistant.startswith("<|vision_start|>")
    assert assistant.endswith(f"{LATENT_START}{LATENT_PAD}{LATENT_PAD}{LATENT_END}\n{r.final_answer}<|im_end|>")


# -- the mask builder itself -----------------------------------------------------------------------------
def test_mask_rule_on_a_handmade_sequence():
    P, Q, T, LT, A, PAD = Seg.PROMPT, Seg.QUESTION_IMAGE, Seg.THOUGHT_IMAGE, Seg.LATENT, Seg.ANSWER, Seg.PAD
    segs = torch.tensor([[PAD, P, Q, P, T, T, A, LT, LT, A, A, PAD]])
    m = build_mask(segs)[0, 0]
    assert m.shape == (12, 12)
    expect = torch.zeros(12, 12, dtype=torch.bool)
    for q in range(12):
        for k in range(q + 1):
            ok = segs[0, k] != PAD and (segs[0, k] != T or segs[0, q] in (LT, T))
            expect[q, k] = bool(ok) or q == k
    assert torch.equal(m, expect)
    assert m[7, 4] and m[8, 5] and not m[9, 4] and not m[6, 5] and not m[10, 5]  # latents see thoughts, answers don't
    assert not m[3, 4]  # causal


def test_ce_loss_equals_the_mean_over_labelled_tokens_and_refuses_a_late_start(loaded, records):
    """ce_loss computes logits from `start` on only (no host sync); the value is the plain mean CE over the
    labelled tokens, for the collator's start (latent_start - 2) and for 0; a start after a label is refused."""
    from lcot.core.loss import ce_loss

    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:3])
    with torch.no_grad():
        hidden, _ = latent_hidden_states(model, b)
    target, keep = b["labels"][:, 1:], b["labels"][:, 1:] != IGNORE
    want = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), target[keep])
    s = b["latent_start"]
    assert (b["labels"][:, :s - 1] == IGNORE).all() and (b["labels"][:, s - 1] != IGNORE).all()
    for start in (0, s - 2):
        torch.testing.assert_close(ce_loss(model.lm_head, hidden, b["labels"], start), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="labels before column"):
        ce_loss(model.lm_head, hidden, b["labels"], s - 1)


def test_image_tokens_and_features_must_match(loaded, records):
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    ids = b["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 0  # one image-pad token fewer
    with pytest.raises(ValueError, match="image-pad tokens and the .* vision features differ"):
        embed_inputs(model, ids, b["pixel_values"], b["image_grid_thw"])
