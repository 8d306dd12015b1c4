"""grad="adjoint" (lcot.fast.adjoint, a Runner's): the full gradient of the latent chain without a recurrence with
gradients, checked against grad="full" (the dynamic-cache recurrence with gradients, the reference) in fp32. The
reference passes (lcot.core.latent.REFERENCE) have no adjoint: there grad="adjoint" is computed as "full"."""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.latent import REFERENCE, Passes
from lcot.core.loss import align_loss
from lcot.core.model import bptt_links, latent_hidden_states
from lcot.fast import Runner


def _grads(model, b, grad: str, runner: Passes | str | None = "off") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward values and parameter gradients of CE on the answer plus an alignment of every latent, by `runner`: a
    Passes, or a new Runner(model, fast=runner) for a string (default: its chain on the dynamic cache), or None for
    the model's own passes (lcot.core.latent.passes_of)."""
    runner = Runner(model, fast=runner) if isinstance(runner, str) else runner
    model.zero_grad(set_to_none=True)
    s, k = b["latent_start"], b["num_latents"]
    hidden, lat = latent_hidden_states(model, b, grad=grad, runner=runner)
    target = torch.linspace(-1, 1, lat.shape[-1], device=lat.device).expand_as(lat)
    ce = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, s + k:-1]).flatten(0, 1),
                                           b["input_ids"][:, s + k + 1:].flatten())
    (ce + align_loss(lat, target)[0]).backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return hidden.detach(), grads


def _largest_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 2e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def _fresh_training_model(tiny_dir):
    """A model of its own (these tests switch gradient checkpointing on), in training mode."""
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir)
    return model.train(), processor


def _padded_pair(processor, config, k, thought, records) -> list:
    """Two records whose prefixes differ in length: the collator left-pads one."""
    length = {i: Collator(processor, config, k, thought_images=thought)([r])["latent_start"]
              for i, r in enumerate(records[:12])}
    first = min(length, key=length.get)
    return [records[first], records[max(length, key=length.get)]]


def _recorded_products(monkeypatch) -> list:
    """Weak references to every lcot.fast.adjoint.Products made from now on (one per adjoint pass with K > 1)."""
    import weakref

    from lcot.fast import adjoint

    kept = []

    class Recorded(adjoint.Products):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            kept.append(weakref.ref(self))

    monkeypatch.setattr(adjoint, "Products", Recorded)
    return kept


@pytest.mark.parametrize(("k", "thought", "fast", "padded"), [
    (1, False, "off", False), (2, False, "static", False), (4, False, "off", True), (3, True, "static", True)])
def test_adjoint_gradient_is_the_full_gradient(loaded, records, k, thought, fast, padded):
    """fast="static": the chain (and the prefix the products use) on the static cache, as on a GPU."""
    model, processor = loaded
    recs = _padded_pair(processor, model.config, k, thought, records) if padded else records[:2]
    b = Collator(processor, model.config, k, thought_images=thought)(recs)
    assert bool((b["attention_mask"] == 0).any()) == padded
    h_full, g_full = _grads(model, b, "full")
    h_adj, g_adj = _grads(model, b, "adjoint", fast)
    _, g_trunc = _grads(model, b, "truncated")
    torch.testing.assert_close(h_adj, h_full, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(g_adj, g_full)
    if k > 1:  # the chain carries gradient: the truncated one is another gradient, and adjoint is not it
        assert _largest_gap(g_trunc, g_full) > 100 * max(_largest_gap(g_adj, g_full), 1e-6)
    else:  # one slot: its input is the prefix's output, which the pass itself computes
        assert _largest_gap(g_trunc, g_full) > 1e-4


def test_the_reference_computes_adjoint_as_full(loaded, tiny_dir, records, monkeypatch):
    """The reference passes have no adjoint: grad="adjoint" there is grad="full", the very same gradient (no
    product is ever made); a model loaded with --fast off takes them. A Runner's adjoint gives the reference's full
    gradient: removing lcot.fast changes no gradient."""
    from lcot.config import SpeedConfig
    from lcot.pipeline.load import load

    model, processor = loaded
    b = Collator(processor, model.config, 4, thought_images=True)(records[:2])
    kept = _recorded_products(monkeypatch)
    assert REFERENCE.adjoint is None
    h_full, g_full = _grads(model, b, "full", REFERENCE)
    h_ref, g_ref = _grads(model, b, "adjoint", REFERENCE)
    assert not kept  # computed as "full": no pass over the slots, no products
    assert torch.equal(h_ref, h_full)
    _assert_same_gradients(g_ref, g_full, atol=0)
    _, g_trunc = _grads(model, b, "truncated", REFERENCE)  # what the chain's gradient is worth: the test can fail
    assert _largest_gap(g_trunc, g_full) > 1e-4
    for fast in ("off", "static"):
        h_adj, g_adj = _grads(model, b, "adjoint", fast)
        torch.testing.assert_close(h_adj, h_full, atol=1e-5, rtol=1e-5)
        _assert_same_gradients(g_adj, g_full)
        assert _largest_gap(g_trunc, g_full) > 100 * max(_largest_gap(g_adj, g_full), 1e-6)
    assert len(kept) == 2  # each Runner's adjoint ran its products
    off, _ = load(tiny_dir, speed=SpeedConfig(fast="off"))  # the reference passes, transformers' attention
    assert off.lcot_runner is None
    off.train(model.training)
    h_off_full, g_off_full = _grads(off, b, "full", None)
    h_off, g_off = _grads(off, b, "adjoint", None)
    assert len(kept) == 2 and torch.equal(h_off, h_off_full)
    _assert_same_gradients(g_off, g_off_full, atol=0)
    torch.testing.assert_close(h_off, h_full, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(g_off, g_full)


def test_adjoint_twice_in_a_row_and_without_gradients(loaded, records, monkeypatch):
    """What it keeps for the backward pass is released with it, even while the output lives on: a second step
    gives the same gradients; a second backward of one forward is refused; under no_grad it is the truncated
    forward."""
    import gc

    kept = _recorded_products(monkeypatch)
    model, processor = loaded
    runner = Runner(model, fast="off")
    b = Collator(processor, model.config, 3, thought_images=True)(records[2:4])
    _, first = _grads(model, b, "adjoint", runner)
    _, second = _grads(model, b, "adjoint", runner)
    assert _largest_gap(first, second) == 0
    hidden, _ = latent_hidden_states(model, b, grad="adjoint", runner=runner)
    loss = hidden.pow(2).mean()
    loss.backward(retain_graph=True)
    gc.collect()
    assert len(kept) == 3 and all(ref() is None for ref in kept)  # the output `hidden` is still alive here
    with pytest.raises(RuntimeError, match="one backward pass per forward"):
        loss.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        h_adj, lat_adj = latent_hidden_states(model, b, grad="adjoint", runner=runner)
        h_trunc, lat_trunc = latent_hidden_states(model, b, grad="truncated", runner=runner)
    assert torch.equal(h_adj, h_trunc) and torch.equal(lat_adj, lat_trunc)


def test_adjoint_with_gradient_checkpointing(tiny_dir, records):
    """The pass with gradients recomputed (checkpointing): still the full gradient of the model without it."""
    model, processor = _fresh_training_model(tiny_dir)
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same_gradients(_grads(model, b, "adjoint")[1], g_full)


def test_adjoint_pass_is_never_the_compiled_one(loaded, records):
    """--compile's module cannot run a second backward (its buffers are donated): adjoint's pass bypasses it."""

    def refuse(*args, **kwargs):
        raise AssertionError("adjoint ran the compiled pass")

    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    runner = Runner(model, fast="off")
    runner._compiled_pass = refuse  # what compile_parallel() sets
    _, g_adj = _grads(model, b, "adjoint", runner)
    with pytest.raises(AssertionError, match="compiled pass"):  # the sentinel is live: truncated takes it
        _grads(model, b, "truncated", runner)
    model.zero_grad(set_to_none=True)
    _assert_same_gradients(g_adj, g_full)


def test_no_latent_slots_take_one_pass_in_every_mode(tiny_dir, records):
    """K=0: nothing is fed back, one parallel pass (also with gradient checkpointing, which has no cache)."""
    model, processor = _fresh_training_model(tiny_dir)
    b = Collator(processor, model.config, 0, thought_images=False)(records[:2])
    ref, g_ref = _grads(model, b, "full")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for grad in ("full", "adjoint", "truncated"):
        hidden, g = _grads(model, b, grad)
        torch.testing.assert_close(hidden, ref, atol=0, rtol=0)
        _assert_same_gradients(g, g_ref, atol=1e-6)


def test_adjoint_is_a_grad_mode():
    assert bptt_links("adjoint") is None
    with pytest.raises(ValueError, match="adjoint"):
        bptt_links("adjoint:2")


@pytest.mark.gpu
def test_graphed_products_equal_eager_ones_and_the_full_gradient(tiny_on):
    """CUDA graphs of the products (adjoint_graphs, on by default) give the eager products' gradient (a runner with
    adjoint_graphs=False captures none), and step after step the memory held stops growing."""
    model, b = tiny_on(5)
    _, g_full = _grads(model, b, "full")
    runner = Runner(model, fast="graph", compile_step="off")
    state = runner.adjoint_state
    _, g_graph = _grads(model, b, "adjoint", runner)
    assert state.captured[5] == 1 and not state.errors and state.graphs
    eager = Runner(model, fast="graph", compile_step="off", adjoint_graphs=False)
    _, g_eager = _grads(model, b, "adjoint", eager)
    assert not eager.adjoint_state.captured and not eager.adjoint_state.streams and state.captured[5] == 1
    for a, c, f in zip(g_graph, g_eager, g_full):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, f, atol=2e-5, rtol=1e-4)
    reserved = []
    for _ in range(6):  # one capture a step, into one pool, on one stream: the memory held stops growing
        _, again = _grads(model, b, "adjoint", runner)  # (a new side stream a step grew it by 73 MB a step)
        reserved.append(torch.cuda.memory_reserved())
    assert state.captured[5] == 7, state.captured
    assert len(state.pools) == len(state.streams) == 1
    assert reserved[-3:] == reserved[-1:] * 3 and reserved[-1] - reserved[0] < 16 * 2**20, reserved
    assert _largest_gap(again, g_graph) < 1e-6


def _compile_on_aot_eager(monkeypatch) -> list[int]:
    """torch.compile on AOTAutograd's eager backend from now on; returns the list of the compiled modules' calls,
    each as its number of input columns."""
    real, calls = torch.compile, []

    def spy(module, **kw):
        compiled = real(module, backend="aot_eager", **kw)
        return lambda **a: calls.append(a["inputs_embeds"].shape[1]) or compiled(**a)

    monkeypatch.setattr(torch, "compile", spy)
    return calls


def _compiled_step_runner(model, **options) -> Runner:
    """A Runner whose chain runs on the static cache with its step compiled (compile_step="on": at its first static
    cache)."""
    return Runner(model, fast="static", compile_step="on", **options)


def test_compiled_pass_over_the_slots_gives_the_full_gradient(loaded, records, monkeypatch):
    """Under a compiled step the pass over the slots runs the compiled language model (here on AOTAutograd's eager
    backend: its backward, run once per product, is the part that must allow it), with full's gradient;
    adjoint_compile=False keeps it uncompiled, and so does a chain on the dynamic cache (fast="off"), which never
    runs the compiled step."""
    model, processor = loaded
    b = Collator(processor, model.config, 4, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    calls = _compile_on_aot_eager(monkeypatch)
    runner = _compiled_step_runner(model)
    # the chain's steps on the static cache run the compiled model first, so that the pass over the slots is a
    # recompile with dynamic shapes, whose backward AOTAutograd compiles at once, not at the first product
    _, g_comp = _grads(model, b, "adjoint", runner)
    assert calls == [1, 1, 1, 1, 3]  # the K steps, then the pass over the K-1 slots
    assert not runner.adjoint_state.errors and not runner.adjoint_state.compile_failed
    _assert_same_gradients(g_comp, g_full)
    uncompiled = _compiled_step_runner(model, adjoint_compile=False)
    _, g_plain = _grads(model, b, "adjoint", uncompiled)
    assert uncompiled._compiled_step is not None and calls == [1, 1, 1, 1, 3] + [1] * 4  # the steps only
    _assert_same_gradients(g_plain, g_full)
    runner.fast = "off"  # the compiled step is there, but the chain runs on the dynamic cache
    _grads(model, b, "adjoint", runner)
    assert runner._compiled_step is not None and calls == [1, 1, 1, 1, 3] + [1] * 4


def test_compiled_pass_over_a_single_slot_keeps_sdpa(loaded, records, monkeypatch):
    """K=2: the compiled pass over the slots is one token, as a step is, but with gradients; it neither fails nor
    falls back, and gives full's gradient. (On an H100 it used to take the steps' FlexAttention, which has no
    backward, and failed; tests/test_attention.py checks the condition itself.)"""
    from lcot.fast import attention

    model, processor = loaded
    b = Collator(processor, model.config, 2, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    flex = []
    real = attention.flex_rows
    monkeypatch.setattr(attention, "flex_rows", lambda *a: flex.append(torch.is_grad_enabled()) or real(*a))
    torch._dynamo.reset()
    calls = _compile_on_aot_eager(monkeypatch)
    runner = _compiled_step_runner(model)
    _, g_comp = _grads(model, b, "adjoint", runner)
    assert calls == [1, 1, 1]  # the 2 steps, then the pass over the 1 slot
    assert flex and not any(flex)  # the steps' attention in FlexAttention, never with gradients
    assert not runner.adjoint_state.errors and not runner.adjoint_state.compile_failed
    _assert_same_gradients(g_comp, g_full)


class _FailsBackward(torch.autograd.Function):
    """Identity whose backward raises: a compiled backward that fails at the first product."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("inductor: backward compilation failed")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_compiled_pass_over_the_slots_falls_back(loaded, records, where):
    """A compiled pass that fails when it runs (after writing into the cache) or in its backward (at the first
    product, inside the backward pass): a warning, the uncompiled pass on the prefix as it came, full's gradient;
    not tried again by that runner. Running out of memory is no compile failure: it propagates."""
    model, processor = loaded
    b = Collator(processor, model.config, 4, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    lm = model.model.language_model

    def broken(**kw):
        cache = kw["past_key_values"]
        if kw["inputs_embeds"].shape[1] == 1:  # the chain's steps (on the static cache) run
            return lm(**kw)
        if where == "forward":  # half-run: one layer's columns written, then the failure
            layer = cache.layers[0]
            cache.update(torch.zeros_like(layer.keys[:, :, :3]), torch.zeros_like(layer.values[:, :, :3]), 0)
            raise RuntimeError("inductor: compilation failed")
        out = lm(**kw)
        out.last_hidden_state = _FailsBackward.apply(out.last_hidden_state)
        return out

    runner = Runner(model, fast="static")
    runner._compiled_step = broken  # the step "compiled": the chain (on the static cache) and the slots' pass run it
    state = runner.adjoint_state
    try:
        with pytest.warns(RuntimeWarning, match="compiled pass over the slots failed"):
            _, g_fallback = _grads(model, b, "adjoint", runner)
        _, g_again = _grads(model, b, "adjoint", runner)  # not tried again (no warning, no error)
        assert len(state.errors) == 1 and state.compile_failed
        _assert_same_gradients(g_fallback, g_full)
        _assert_same_gradients(g_again, g_full)
        state.compile_failed = False

        def oom(**kw):
            if kw["inputs_embeds"].shape[1] == 1:
                return lm(**kw)
            raise torch.OutOfMemoryError("CUDA out of memory")

        runner._compiled_step = oom
        with pytest.raises(torch.OutOfMemoryError):
            _grads(model, b, "adjoint", runner)
        assert not state.compile_failed and len(state.errors) == 1
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.gpu
def test_compiled_products_are_graphed_and_give_the_full_gradient(tiny_on):
    """With inductor (Triton kernels) the products of the compiled pass are captured and replayed as CUDA graphs
    like the uncompiled ones, and give full's gradient."""
    model, b = tiny_on(5)
    _, g_full = _grads(model, b, "full")
    runner = Runner(model, fast="graph", compile_step="on")
    runner._compile_step()
    compiled, passes = runner._compiled_step, []
    runner._compiled_step = lambda **kw: passes.append(kw["inputs_embeds"].shape[1]) or compiled(**kw)
    state = runner.adjoint_state
    for _ in range(2):
        _, g = _grads(model, b, "adjoint", runner)
    assert [n for n in passes if n > 1] == [4, 4]  # the compiled pass over the K-1 slots, once a step
    assert state.captured[5] == 2 and not state.errors and not state.compile_failed
    assert not runner.compile_failed
    _assert_same_gradients(g, g_full)


def test_compiled_pass_over_the_slots_with_lora(tiny_dir, records, monkeypatch):
    """The same with peft's LoRA layers in the compiled pass (only the adapters train): full's gradient."""
    from conftest import lora_tiny

    model, b = lora_tiny(tiny_dir, records, torch.float32)
    model.train()
    _, g_full = _grads(model, b, "full")
    calls = _compile_on_aot_eager(monkeypatch)
    runner = _compiled_step_runner(model)
    _, g_comp = _grads(model, b, "adjoint", runner)
    assert calls == [1, 1, 1, 2]
    assert not runner.adjoint_state.errors
    assert any(g.abs().max() > 0 for g in g_full)
    _assert_same_gradients(g_comp, g_full)
