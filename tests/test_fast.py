"""The fast latent path (lcot.fast.graph, run by lcot.fast.Runner) against the reference dynamic-cache path, in
fp32 on CPU.

CUDA graphs cannot run here: `FakeGraph` stands in for capture/replay with the same contract (the
capture leaves the cache position where it was, a replay re-runs the captured step on whatever the
buffers hold and writes one fixed output buffer), so the buffer discipline around the graph is tested.
"""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.latent import REFERENCE, EagerLatents, embed_inputs
from lcot.core.loss import align_loss
from lcot.core.model import latent_hidden_states
from lcot.fast import graph as fast
from lcot.fast.runner import KEEP, Runner, resolve
from lcot.pipeline.generate import generate_batch

TOL = {"atol": 5e-6, "rtol": 1e-5}  # the static cache attends over more (masked) slots: summation order only


def collate(loaded, recs, k, thought=True):
    model, processor = loaded
    return Collator(processor, model.config, k, thought_images=thought)(recs)


class FakeGraph:
    """CPU stand-in of a captured CUDA graph: replay() re-runs the step into one fixed output buffer."""

    def __init__(self, step):
        self.step, self.replays = step, 0
        self.out = None

    def replay(self):
        self.replays += 1
        self.out.copy_(self.step())


def fake_capture(step, rewind, device):
    graph = FakeGraph(step)
    for _ in range(fast.WARMUP):  # the warm-up runs for real, as on a GPU
        rewind()
        step()
    rewind()
    graph.out = step().clone()  # shape of the output; then undo, since a capture runs nothing
    rewind()
    return graph, graph.out


def fake_runner(model, **kwargs) -> Runner:
    """A runner whose static caches 'capture' FakeGraphs on the CPU (fast="graph" gives eager static steps there)."""
    runner = Runner(model, fast="static", capture=fake_capture, **kwargs)
    make = runner.fast_latents

    def graphed(model, batch_size, length, graph=False):
        fl = make(model, batch_size, length, graph)
        fl.graph = fl.prefix_graphs = True
        return fl

    runner.fast_latents = graphed
    return runner


@pytest.fixture
def graphed():
    """make(model, max_len, batch_size) -> a FastLatents with graph=True that 'captures' FakeGraphs on the CPU."""
    def make(model, max_len, batch_size, runner=None):
        fl = fast.FastLatents(runner or Runner(model, capture=fake_capture), model, max_len, batch_size)
        fl.graph = fl.prefix_graphs = True
        return fl

    return make


def recurrence(steps, model, b):
    """Prefix, K latent steps, suffix through `steps` (EagerLatents or FastLatents)."""
    s, k = b["latent_start"], b["num_latents"]
    mask, pos = b["attention_mask_4d"], b["position_ids"]
    embeds = embed_inputs(model, b["input_ids"], b["pixel_values"], b["image_grid_thw"])
    pre = steps.forward(embeds[:, :s], mask, pos, slice(0, s))
    lat_in, lat_out = steps.run(pre[:, -1:], mask, pos, s, k)
    post = steps.forward(embeds[:, s + k:], mask, pos, slice(s + k, embeds.shape[1]))
    return pre, lat_in, lat_out, post


# -- 1. static-cache recurrence == dynamic-cache latent_loop --------------------------------------------------
@pytest.mark.parametrize("use_graph", [False, True])
def test_static_cache_recurrence_equals_latent_loop(loaded, records, graphed, use_graph):
    model, _ = loaded
    b = collate(loaded, records[:3], k=5)  # three records of different lengths: left padding is exercised
    length = b["input_ids"].shape[1]
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
        fl = graphed(model, length + 7, 3) if use_graph else fast.FastLatents(Runner(model), model, length + 7, 3)
        got = recurrence(fl, model, b)
        again = recurrence(fl, model, b)  # a second sequence on the same cache (and graph)
    m = b["attention_mask"].bool()
    s, k = b["latent_start"], b["num_latents"]
    valid = {"prefix": m[:, :s], "latent inputs": m[:, s:s + k], "latent outputs": m[:, s:s + k],
             "suffix": m[:, s + k:]}  # padding rows of the prefix hold arbitrary (finite) values
    for (name, keep), r, g, a in zip(valid.items(), ref, got, again):
        torch.testing.assert_close(g[keep], r[keep], **TOL, msg=name)
        assert torch.equal(a, g), name  # the same cache reused gives the same bits
    assert ref[2].abs().max() > 0.1 and (ref[2][:, 1] - ref[2][:, 0]).abs().max() > 1e-3  # not degenerate
    if use_graph:
        assert fl.captures == 1 and fl._graph.replays == 2 * k  # captured once, replayed every step


def test_fast_latents_reused_across_batches_of_other_lengths(loaded, records, graphed):
    """A longer batch first leaves stale keys in the slots a shorter one does not write: they stay masked."""
    model, _ = loaded
    long = collate(loaded, records[:2], k=6)
    short = collate(loaded, [records[2], records[3]], k=3)
    fl = graphed(model, 256, 2)
    with torch.no_grad():
        recurrence(fl, model, long)
        got = recurrence(fl, model, short)
        ref = recurrence(EagerLatents(model), model, short)
    torch.testing.assert_close(got[2], ref[2], **TOL)
    assert fl.captures == 1  # the same graph serves both: only the buffers and the positions differ


@pytest.mark.parametrize("mode", ["static", "graph"])
def test_latent_hidden_states_fast_modes_equal_reference(loaded, records, mode):
    model, _ = loaded
    b = collate(loaded, records[:3], k=4)
    runner = Runner(model, fast=mode)  # "graph" on CPU runs eager static steps
    with torch.no_grad():
        h_ref, lat_ref = latent_hidden_states(model, b, runner=REFERENCE)
        h, lat = latent_hidden_states(model, b, runner=runner)
        h_t, lat_t = latent_hidden_states(model, b, grad="truncated", runner=runner)
    m = b["attention_mask"].bool()
    torch.testing.assert_close(h[m], h_ref[m], **TOL)
    torch.testing.assert_close(lat, lat_ref, **TOL)
    torch.testing.assert_close(h_t[m], h_ref[m], **TOL)
    torch.testing.assert_close(lat_t, lat_ref, **TOL)


def test_eager_attention_static_cache(tiny_dir, records, loaded):
    """Eager attention reads the additive form of the padded mask rows: same values."""
    from lcot.pipeline.load import load

    eager, _ = load(tiny_dir, attn_implementation="eager")
    eager.eval()
    b = collate(loaded, records[:2], k=3)
    with torch.no_grad():
        h_ref, lat_ref = latent_hidden_states(eager, b, runner=Runner(eager, fast="off"))
        h, lat = latent_hidden_states(eager, b, runner=Runner(eager, fast="static"))
    assert torch.isfinite(h).all()
    torch.testing.assert_close(lat, lat_ref, **TOL)
    m = b["attention_mask"].bool()
    torch.testing.assert_close(h[m], h_ref[m], **TOL)


# -- 2. a truncated training step through the fast path == the eager one ----------------------------------------
def test_truncated_training_step_through_fast_path(loaded, records):
    model, _ = loaded
    b = collate(loaded, records[:2], k=4)
    teacher = torch.randn(2, 4, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    runners = {"off": Runner(model, fast="off"), "graph": fake_runner(model)}

    def step(mode):
        model.zero_grad()
        out = model(input_ids=b["input_ids"], attention_mask_4d=b["attention_mask_4d"],
                    position_ids=b["position_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                    labels=b["labels"], latent_mode=True, latent_start=b["latent_start"],
                    num_latents=b["num_latents"], grad="truncated", runner=runners[mode], return_logits=False)
        loss = out.loss + align_loss(out.latent_hidden, teacher)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    try:
        loss_ref, g_ref = step("off")
        loss_fast, g_fast = step("graph")  # a fake-graphed FastLatents
    finally:
        model.zero_grad()
    made = list(runners["graph"]._kept.values())
    assert len(made) == 1 and made[0].captures == 1
    torch.testing.assert_close(loss_fast, loss_ref, **TOL)
    assert sum(g.abs().sum() for g in g_ref) > 0
    for gf, gr in zip(g_fast, g_ref):
        torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-4)


def test_prefix_pass_is_graphed_from_its_second_length_on(loaded, records, graphed, monkeypatch):
    """The pass from column 0 is captured the second time its length comes (once per length, at most
    KEEP_PREFIXES lengths), replayed after that, with the eager values; new weights invalidate it."""
    model, _ = loaded
    monkeypatch.setattr(fast, "KEEP_PREFIXES", 2)
    by_length = {}
    for thought in (True, False):  # three batches of three prefix lengths
        for i in range(0, len(records) - 1, 2):
            b = collate(loaded, records[i:i + 2], k=3, thought=thought)
            by_length.setdefault(b["latent_start"], b)
    batches = list(by_length.values())[:3]
    assert len(batches) == 3
    fl = graphed(model, 256, 2)
    with torch.no_grad():
        refs = [recurrence(EagerLatents(model), model, b) for b in batches]
        for _ in range(3):
            for b, ref in zip(batches, refs):
                got = recurrence(fl, model, b)
                m = b["attention_mask"].bool()
                for r, g, keep in zip(ref, got, (m[:, :b["latent_start"]], None, None, None)):
                    torch.testing.assert_close(g if keep is None else g[keep], r if keep is None else r[keep], **TOL)
    lengths = [b["latent_start"] for b in batches]
    assert sorted(fl._prefix) == sorted(lengths[:2])  # the third length found no room: eager
    assert [fl._prefix[n][0].replays for n in lengths[:2]] == [2, 2]  # captured in pass 2, replayed in 2 and 3
    assert fl.valid()
    w = model.model.language_model.norm.weight
    old = w.data
    w.data = w.data.clone()
    try:
        assert not fl.valid()  # a prefix graph reads the old weights
    finally:
        w.data = old


def test_failed_prefix_capture_falls_back_to_eager(loaded, records, monkeypatch):
    model, _ = loaded
    b = collate(loaded, records[:2], k=3)
    calls = []

    def broken(step, rewind, device):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    fl = fast.FastLatents(Runner(model, capture=broken), model, 256, 2)
    fl.prefix_graphs = True
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
        recurrence(fl, model, b)
        with pytest.warns(RuntimeWarning, match="capture of the prefix failed"):
            got = recurrence(fl, model, b)
        again = recurrence(fl, model, b)
    assert not fl.prefix_graphs and not fl._prefix and len(calls) == 1  # tried once
    for g in (got, again):
        torch.testing.assert_close(g[2], ref[2], **TOL)


def test_failed_capture_falls_back_to_eager_steps(loaded, records, monkeypatch):
    model, _ = loaded
    b = collate(loaded, records[:2], k=3)

    def broken(step, rewind, device):
        step()  # e.g. a capture that fails after the warm-up wrote the cache and moved its position
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = Runner(model, capture=broken)
    fl = fast.FastLatents(runner, model, 256, 2)
    fl.graph = True
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="capture failed"):
        got = recurrence(fl, model, b)
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
    assert not fl.graph and fl._graph is None and len(runner.capture_errors) == 1
    torch.testing.assert_close(got[2], ref[2], **TOL)


@pytest.mark.parametrize("setting", ["auto", "on"])
def test_a_failing_compiled_step_is_dropped_and_the_eager_step_graphed(loaded, records, graphed, setting):
    """A compiled step that fails at the warm-up (a broken inductor): the capture retries with the eager step,
    which the graph then replays; the runner does not compile that model's step again."""
    model, _ = loaded
    b = collate(loaded, records[:2], k=3)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("inductor: compilation failed")

    runner = Runner(model, compile_step=setting, capture=fake_capture)
    runner._compiled_step = broken
    fl = graphed(model, 256, 2, runner)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="compiled latent step failed"):
        got = recurrence(fl, model, b)
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
        again = recurrence(runner.fast_latents(model, 2, 512), model, b)  # a new static cache: no compile
    assert calls == [1] and runner._compiled_step is None and runner.compile_failed  # tried once, then dropped
    assert len(runner.compile_errors) == 1 and not runner.capture_errors  # the graph itself was captured
    assert fl.graph and fl._graph is not None and fl._graph.replays == 3  # all K=3 steps replay it
    for g in (got, again):
        torch.testing.assert_close(g[2], ref[2], **TOL)


@pytest.mark.gpu
def test_a_failing_compiled_step_falls_back_to_a_real_graph_of_the_eager_step(tiny_on):
    model, b = tiny_on(3)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: compilation failed")

    runner = Runner(model, kernels=False)  # with lcot.fast.skinny's kernels the graph compiles its own copy
    runner._compiled_step = broken
    fl = fast.FastLatents(runner, model, 256, 2, graph=True)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="compiled latent step failed"):
        got = recurrence(fl, model, b)
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
    assert runner._compiled_step is None and isinstance(fl._graph, torch.cuda.CUDAGraph) and fl.captures == 1
    torch.testing.assert_close(got[2], ref[2], **TOL)


@pytest.mark.gpu
def test_auto_compiled_step_is_compiled_at_the_first_graph(tiny_on):
    """--compile_step auto (the default): the first graphed FastLatents compiles the step, and the graph replays the
    compiled step, within a few fp32 ulps of the eager recurrence (tests/test_compile.py's bound)."""
    model, b = tiny_on(3)
    runner = Runner(model, compile_step="auto")
    with torch.no_grad():
        ref = recurrence(EagerLatents(model), model, b)
        assert runner._compiled_step is None
        fl = runner.fast_latents(model, 2, 256, graph=True)
        assert runner._compiled_step is not None
        got = recurrence(fl, model, b)
    assert isinstance(fl._graph, torch.cuda.CUDAGraph) and fl.captures == 1 and not runner.compile_failed
    torch.testing.assert_close(got[2], ref[2], atol=5e-6, rtol=1e-5)


def test_fast_path_refuses_gradients(loaded, records):
    model, _ = loaded
    b = collate(loaded, records[:1], k=2)
    runner = Runner(model, fast="static")
    fl = fast.FastLatents(runner, model, 256, 1)
    embeds = embed_inputs(model, b["input_ids"], b["pixel_values"], b["image_grid_thw"])
    with pytest.raises(RuntimeError, match="without gradients"):
        fl.forward(embeds[:, :4], b["attention_mask_4d"], b["position_ids"], slice(0, 4))
    assert isinstance(runner.recurrence(model, 1, 100), EagerLatents)  # grad enabled: the reference
    with torch.no_grad():
        assert isinstance(runner.recurrence(model, 1, 100), fast.FastLatents)


# -- 3. generation: same latents, same answers -------------------------------------------------------------------
def test_generation_equal_through_fast_path(loaded, records):
    model, processor = loaded
    recs = records[:3]
    ref = generate_batch(model, processor, recs, num_latents=4, max_new_tokens=6, runner=REFERENCE)
    runner = fake_runner(model)
    timings = {}
    got = generate_batch(model, processor, recs, num_latents=4, max_new_tokens=6, runner=runner, timings=timings)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.latents, r.latents, **TOL)
        assert g.answer == r.answer
    [fl] = runner._kept.values()
    assert fl.captures == 1 and fl._graph.replays == 4 + timings["decode_steps"]  # latent and decoding steps
    assert timings["latents_steps"] == 4 and timings["decode_steps"] >= 1
    # fixed latent inputs (causal-use checks) go through the static cache in one pass
    fixed = torch.randn(3, 4, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    a = generate_batch(model, processor, recs, num_latents=4, max_new_tokens=4, latent_inputs=fixed, runner=REFERENCE)
    c = generate_batch(model, processor, recs, num_latents=4, max_new_tokens=4, latent_inputs=fixed,
                       runner=Runner(model, fast="static"))
    for x, y in zip(a, c):
        torch.testing.assert_close(y.latents, x.latents, **TOL)
        assert x.answer == y.answer


# -- the pieces -------------------------------------------------------------------------------------------------
def test_step_rows_are_the_dynamic_rows_padded(loaded, records):
    b = collate(loaded, records[:2], k=5)
    mask, s = b["attention_mask_4d"], b["latent_start"]
    width = fast.bucket(mask.shape[-1])
    rows = fast.step_rows(mask, s, 5, width)
    assert rows.shape == (2, 1, 5, width) and rows.dtype == torch.bool
    for j in range(5):
        c = s + j
        assert torch.equal(rows[:, :, j, :c + 1], mask[:, :, c, :c + 1])  # what text_forward slices
        assert not rows[:, :, j, c + 1:].any()  # later slots (unwritten or stale) are masked
        assert torch.equal(rows[:, :, j:j + 1], fast.pad_rows(mask, slice(c, c + 1), width))
    with pytest.raises(ValueError, match="beyond"):
        fast.pad_rows(mask, slice(0, width + 1), width)


def test_resolve_modes():
    assert resolve("auto", "cpu") == "off"  # CPU: the dynamic cache
    assert resolve("auto", "cuda") == "graph" and resolve("auto", "cuda", is_sharded=True) == "off"
    assert resolve("graph", "cpu") == "static" and resolve("graph", "cuda") == "graph"
    assert resolve("off", "cuda") == "off" and resolve("static", "cuda") == "static"
    with pytest.raises(ValueError, match="fast must be one of"):
        resolve("fastest", "cpu")


def test_registry_reuses_and_replaces(loaded, records):
    model, _ = loaded
    runner = Runner(model, fast="static")
    a = runner.fast_latents(model, 2, 100)
    assert runner.fast_latents(model, 2, 200) is a  # same bucket
    assert runner.fast_latents(model, 2, 300) is not a and a.max_len == fast.BUCKET
    for n in range(3, 3 + KEEP):
        runner.fast_latents(model, n, 100)
    assert runner.fast_latents(model, 2, 100) is not a  # evicted (least recently used)
    # a captured graph is replaced once the parameters it read change
    b = collate(loaded, records[:2], k=2)
    runner = fake_runner(model)
    g = runner.fast_latents(model, 2, 100)
    with torch.no_grad():
        recurrence(g, model, b)
    assert g.captures == 1 and g.valid() and runner.fast_latents(model, 2, 100) is g
    w = model.model.language_model.norm.weight
    old = w.data
    try:
        w.data = old.clone()
        assert not g.valid() and runner.fast_latents(model, 2, 100) is not g
    finally:
        w.data = old
