"""lcot.lab.analysis and lcot.lab.notebook against independent computations on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.loss import per_position_cosine
from lcot.core.mask import Seg
from lcot.core.model import latent_hidden_states
from lcot.io import save_torch
from lcot.lab import analysis as A
from lcot.pipeline.generate import generate_batch
from lcot.pipeline.teacher import precompute, teacher_file


@pytest.fixture(scope="module")
def teacher_dir(loaded, records, tmp_path_factory) -> Path:
    model, processor = loaded
    out = tmp_path_factory.mktemp("teacher")
    precompute(model, processor, records[:6], out, 4, batch_size=3, progress=False)
    return out


def test_segment_access_states_the_rule(loaded, records):
    model, processor = loaded
    acc = A.segment_access(Collator(processor, model.config, 3, thought_images=True)(records[:2]), row=1)
    assert acc[(Seg.LATENT, Seg.THOUGHT_IMAGE)] == 1.0
    assert acc[(Seg.ANSWER, Seg.THOUGHT_IMAGE)] == 0.0
    assert acc[(Seg.THOUGHT_IMAGE, Seg.THOUGHT_IMAGE)] == 1.0
    assert acc[(Seg.ANSWER, Seg.QUESTION_IMAGE)] == 1.0
    assert not any(Seg.PAD in pair for pair in acc)
    assert "query: answer" in A.access_table(Collator(processor, model.config, 3, thought_images=True)(records[:1]))


def test_thought_pixel_rows(loaded, records):
    model, processor = loaded
    b = Collator(processor, model.config, 2, thought_images=True)(records[:2])
    rows = A.thought_pixel_rows(records[:2], b["image_grid_thw"])
    assert rows.shape[0] == b["pixel_values"].shape[0]
    per_image = b["image_grid_thw"].prod(-1).tolist()
    n_q, n_t = len(records[0].question_images), len(records[0].thought_images)
    assert int(rows.sum()) == sum(per_image[n_q:n_q + n_t]) + sum(per_image[n_q + n_t + n_q:])
    assert not rows[: per_image[0]].any()  # the first record's question image


def test_bottleneck_check(loaded, records):
    model, processor = loaded
    k0 = A.bottleneck_check(model, processor, records[:2], 0)
    assert k0["prompt"] == 0 and k0["question image"] == 0 and k0["answer"] < 1e-6
    assert k0["thought image"] > 1e-2 and k0["latent"] is None
    k3 = A.bottleneck_check(model, processor, records[:2], 3)
    assert k3["latent"] > 1e-4 and k3["answer"] > 1e-6 and k3["prompt"] == 0


def test_latent_inputs_are_what_generation_feeds(loaded, records):
    model, processor = loaded
    recs = records[:3]
    own = A.latent_inputs(model, processor, recs, 3)
    normal = generate_batch(model, processor, recs, 3, max_new_tokens=5)
    fed = generate_batch(model, processor, recs, 3, max_new_tokens=5, latent_inputs=own)
    for a, b, inp in zip(normal, fed, own):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inp[1:], a.latents[:-1], atol=1e-5, rtol=1e-5)  # slot j+1 is fed slot j's output
        assert a.answer == b.answer


def test_causal_use(loaded, records):
    model, processor = loaded
    recs = records[:4]
    use = A.causal_use(model, processor, recs, 2, batch_size=3, max_new_tokens=5)
    assert set(use.accuracy) == set(A.CONDITIONS) and set(use.changed) == set(A.CONDITIONS) - {"normal"}
    normal = [g.answer for g in generate_batch(model, processor, recs, 2, max_new_tokens=5)]
    zeros = [g.answer for g in generate_batch(model, processor, recs, 2, max_new_tokens=5,
                                              latent_inputs=torch.zeros(4, 2, model.config.text_config.hidden_size))]
    assert use.answers["normal"] == normal and use.answers["zero"] == zeros  # batches of 3 vs 4: same answers
    assert use.changed["zero"] == sum(a != b for a, b in zip(zeros, normal)) / 4
    assert all(0 <= v <= 1 for v in [*use.accuracy.values(), *use.changed.values()])
    assert "pad embedding" in use.summary()
    with pytest.raises(ValueError, match="K >= 1"):
        A.causal_use(model, processor, recs, 0)


def test_interventions_change_the_latents_as_described():
    gen = torch.Generator().manual_seed(0)
    own = torch.randn(6, 3, 8, generator=gen) * torch.arange(1, 7.0)[:, None, None]
    pad = torch.randn(8, generator=gen)
    assert A.intervene(own, "normal") is None
    assert torch.equal(A.intervene(own, "zero"), torch.zeros_like(own))
    shuffled = A.intervene(own, "shuffle", seed=1)
    rows = [next(i for i in range(6) if torch.equal(shuffled[n], own[i])) for n in range(6)]
    assert sorted(rows) == list(range(6)) and all(r != n for n, r in enumerate(rows))  # every record gets another's
    mean = A.intervene(own, "mean")
    torch.testing.assert_close(mean, own.mean(0, keepdim=True).expand(6, 3, 8))
    noise = A.intervene(own, "noise", seed=2)
    torch.testing.assert_close(noise.norm(dim=-1), own.norm(dim=-1))  # same norm per latent
    assert torch.nn.functional.cosine_similarity(noise, own, dim=-1).abs().max() < 0.99  # another direction
    assert not torch.equal(noise, A.intervene(own, "noise", seed=3))
    assert torch.equal(A.intervene(own, "pad embedding", pad=pad), pad.expand(6, 3, 8))
    with pytest.raises(ValueError, match="unknown condition"):
        A.intervene(own, "scramble")


def test_cosine_vs_k_matches_the_teacher_setting_exactly(loaded, records, teacher_dir):
    """The teacher was computed by this model with thought images: the same setting must give cosine 1."""
    model, processor = loaded
    res = A.cosine_vs_k(model, processor, records[:6], [1, 2, 4], teacher_dir, thought_images=True, batch_size=4)
    for k in (1, 2, 4):
        assert len(res.own[k]) == k
        assert min(res.own[k]) > 1 - 1e-5
    student = A.cosine_vs_k(model, processor, records[:6], [2], teacher_dir, thought_images=False)
    b = Collator(processor, model.config, 2, thought_images=False)(records[:6])
    _, lat = latent_hidden_states(model, b)
    ref = per_position_cosine(lat, A.load_teachers(teacher_dir, records[:6], 2)).mean(0)
    torch.testing.assert_close(torch.tensor(student.own[2]), ref, atol=1e-5, rtol=0)


def test_teacher_stats_flags_collapse(records, tmp_path):
    recs = records[:5]
    same = torch.randn(3, 16)
    for r in recs:  # every record gets the same latents: complete collapse
        save_torch(teacher_file(tmp_path / "collapsed", r.idx), {"latents": same, "record_digest": r.digest})
    gen = torch.Generator().manual_seed(0)
    for r in recs:  # independent random latents: no collapse
        save_torch(teacher_file(tmp_path / "varied", r.idx),
                   {"latents": torch.randn(3, 16, generator=gen), "record_digest": r.digest})
    collapsed = A.teacher_stats(tmp_path / "collapsed", recs)
    assert collapsed.latents.shape == (5, 3, 16)
    assert collapsed.across_mean == pytest.approx(1.0, abs=1e-6)
    assert "collapse" in collapsed.summary()
    torch.testing.assert_close(collapsed.norms, same.norm(dim=-1).expand(5, 3))
    varied = A.teacher_stats(tmp_path / "varied", recs)
    assert varied.across_mean < 0.5 and "collapse" not in varied.summary()
    torch.testing.assert_close(torch.diagonal(varied.within), torch.ones(3))


def test_accuracy_grid_loads_each_model_once_and_keeps_the_asked_ks(records, monkeypatch):
    loaded, calls = [], []

    def fake_evaluate(model, processor, recs, ks, thought_images=False, progress=True, **kw):
        calls.append((model, list(ks), thought_images, kw))
        return {"accuracy": {k: {"a": 0.25, "b": 0.5}[model] + k / 100 for k in (*ks, 99)}}

    monkeypatch.setattr(A, "evaluate", fake_evaluate)
    grid = A.accuracy_grid({"first": "dir_a", "second": "dir_b"}, records[:4], [0, 2],
                           load=lambda path: loaded.append(path) or (path[-1], None), thought_images=True,
                           max_new_tokens=3)
    assert loaded == ["dir_a", "dir_b"]
    assert calls == [("a", [0, 2], True, {"max_new_tokens": 3}), ("b", [0, 2], True, {"max_new_tokens": 3})]
    assert grid.accuracy == {"first": {0: 0.25, 2: 0.27}, "second": {0: 0.5, 2: 0.52}}  # K=99 was not asked for
    text = grid.summary(0.4)
    assert "K=2" in text and "0.520" in text and "majority-answer baseline: 0.400" in text
    assert "WARNING" not in text


def test_notebook_setup_and_cached_prerequisite(tmp_path):
    from lcot.lab.notebook import Setup, prerequisite, setup

    s = setup("nb", run_root=tmp_path / "runs", figures=tmp_path / "figs", threads=None)
    assert s.run == tmp_path / "runs" / "nb" and s.run.is_dir()
    assert (s.model / "config.json").is_file() and s.train_jsonl.is_file() and s.test_jsonl.is_file()
    assert not s.real and s.dtype == torch.float32 and "lora" not in s.train_flags(10)
    again = setup("nb2", run_root=tmp_path / "runs", figures=tmp_path / "figs", threads=None)
    assert again.model == s.model and again.train_jsonl == s.train_jsonl  # shared, built once

    stage1 = prerequisite(s, "stage1", num_latents=2, steps=2)
    weights = stage1 / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert prerequisite(again, "stage1", num_latents=2, steps=2) == stage1  # reused by another notebook
    assert weights.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="stage must be one of"):
        prerequisite(s, "stage4", num_latents=2, steps=2)

    from lcot.lab.notebook import PREREQUISITE_FILE

    teacher = prerequisite(s, "teacher", num_latents=2, steps=2)
    one = teacher_file(teacher, 0)
    t_stamp = one.stat().st_mtime_ns
    (stage1 / PREREQUISITE_FILE).unlink()  # a stage1 build killed before it finished: it rebuilds
    assert prerequisite(s, "teacher", num_latents=2, steps=2) == teacher
    assert weights.stat().st_mtime_ns != stamp and one.stat().st_mtime_ns != t_stamp

    real = Setup("x", s.model, s.train_jsonl, s.test_jsonl, "cuda", s.run, s.shared, s.figures, real=True)
    flags = real.train_flags(100)
    assert real.dtype == torch.bfloat16
    assert flags["lora"] and flags["bf16"] and flags["gradient_checkpointing"] and flags["latent_grad"] == "truncated"


# -- the detectors of degenerate results, on constructed inputs -------------------------------------------------
def test_collapse_warning_on_collapsed_and_varied_latents():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 16, generator=gen)
    collapsed = base.expand(6, 3, 16) + 1e-4 * torch.randn(6, 3, 16, generator=gen)
    warning = A.collapse_warning(collapsed)
    assert warning.startswith("WARNING: collapsed latents: mean cosine between records 1.000")
    assert "norm std 0.000 of the mean, record-specific part 0.0% of the norm" in warning
    assert A.collapse_warning(torch.randn(6, 3, 16, generator=gen)) is None
    assert A.collapse_warning(base[None]) is None  # one record: nothing to compare
    noise = torch.randn(6, 3, 16, generator=gen)
    shared = base.expand(6, 3, 16) * 30 + noise  # one shared direction dominates: collapse though norms vary
    assert A.cosine_across(shared).mean() > A.COLLAPSE_COSINE
    assert A.collapse_warning(shared).startswith("WARNING: one record-independent direction dominates")
    partial = base.expand(6, 3, 16) * 3 + noise  # a large shared part, but records still differ
    assert A.cosine_across(partial).mean() < A.COLLAPSE_COSINE and A.collapse_warning(partial) is None


def test_constant_predictor_is_named_with_the_majority_rate():
    warning = A.constant_warning(["1", "1 ", "1"], majority=0.183, what="stage3")
    assert warning.startswith('WARNING: stage3 answers "1" for every record')
    assert "majority-answer rate is 0.183" in warning
    assert A.constant_warning(["1", "2", "1"], 0.183) is None
    cell = A.accuracy_cell(0.146, ["1", "1"], 0.183)
    assert cell == '0.146 (answers "1" for every record; majority-answer rate 0.183)'
    assert A.accuracy_cell(0.5, ["1", "2"], 0.183) == "0.500"
    assert A.accuracy_cell(0.19, ["1", "2"], 0.183) == "0.190 (not above the majority-answer rate)"


def test_benefit_warning_only_near_zero():
    assert "near zero" in A.benefit_warning(0.31, 0.30)
    assert A.benefit_warning(1.0, 0.1) is None


def test_grid_table_marks_constant_models():
    text = A.grid_table({"stage3": {0: 0.15, 4: 0.15}, "stage2": {0: 0.4, 4: 0.5}}, 0.15,
                        {"stage3": {0: "1", 4: "1"}, "stage2": {0: None, 4: None}})
    assert '0.150 ("1" for all)' in text
    assert 'WARNING: stage3 answers "1" for every record at K=0, 4' in text and "majority-answer rate is 0.150" in text
    assert "stage2 answers" not in text and "learnt nothing" not in text
    flat = A.grid_table({"a": {1: 0.15}}, 0.15, {"a": {1: None}})
    assert "no model beats the majority-answer rate" in flat


def test_causal_use_summary_does_not_read_a_constant_model_as_ignoring_latents():
    const = A.CausalUse(4, {"normal": 0.2, "zero": 0.2}, {"zero": 0.0}, {"normal": ["1"] * 5, "zero": ["1"] * 5},
                        majority=0.2)
    text = const.summary()
    assert 'answers "1" for every record' in text and "majority-answer rate 0.200" in text
    assert "does not show that a model which answers the question ignores its latents" in text
    assert "do not depend on the latent inputs" not in text
    varied = list("12312")
    real = A.CausalUse(4, {"normal": 0.6, "zero": 0.6}, {"zero": 0.0}, {"normal": varied, "zero": varied}, majority=0.4)
    assert real.warnings() == ["no answer changed under any replacement: the answers do not depend on the latent "
                               "inputs"]
    moved = A.CausalUse(4, {"normal": 0.6, "zero": 0.2}, {"zero": 0.6}, {"normal": varied, "zero": list("33333")},
                        majority=0.4)
    assert moved.warnings() == []


def test_probe_grid_warns_when_nothing_beats_chance():
    from lcot.lab.probe import ProbeGrid

    flat = ProbeGrid([[0.25, 0.2], [0.26, 0.21]], [0.25, 0.2], [10, 10])
    assert "no probe beats its majority-state rate" in flat.summary()
    good = ProbeGrid([[0.9, 0.2], [0.3, 0.21]], [0.25, 0.2], [10, 10])
    assert good.warning() is None and "WARNING" not in good.summary()


def test_cosine_vs_k_warns_when_own_equals_another_records_teacher():
    same = A.CosineVsK({4: [0.999, 0.999]}, {4: [0.999, 0.998]})
    assert "as well as their own" in same.summary()
    apart = A.CosineVsK({4: [0.9, 0.8]}, {4: [0.3, 0.2]})
    assert "WARNING" not in apart.summary()
