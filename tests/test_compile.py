"""--compile: the language model's passes without a cache run compiled, with the eager values; checkpoints unchanged."""

from __future__ import annotations

import torch

from lcot.core.collate import Collator
from lcot.core.latent import _COMPILED, compile_parallel_pass
from lcot.core.model import latent_hidden_states


def test_compiled_parallel_pass_equals_eager(loaded, records, monkeypatch):
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    calls = []
    real = torch.compile

    def spy(module, **kw):  # the real compile, on the eager backend (no C++ toolchain needed)
        calls.append(module)
        return real(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", spy)
    ref_h, ref_lat = latent_hidden_states(model, b, grad="truncated")
    keys = set(model.state_dict())
    compile_parallel_pass(model)
    try:
        assert calls == [model.model.language_model] and set(model.state_dict()) == keys
        compiled, used = _COMPILED[model], []
        _COMPILED[model] = lambda **kw: used.append(1) or compiled(**kw)
        h, lat = latent_hidden_states(model, b, grad="truncated")
        assert len(used) == 1  # the pass with gradients; the prefix and the latent steps go through the cache
        torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lat, ref_lat, atol=1e-5, rtol=1e-5)
        h.pow(2).mean().backward()
        assert model.model.language_model.layers[0].mlp.down_proj.weight.grad is not None
    finally:
        compile_parallel_pass(model, enable=False)
        model.zero_grad()
    assert model not in _COMPILED


def test_compiled_static_steps_equal_the_reference(loaded, records, monkeypatch):
    """LCOT_COMPILE_STEP=1: the one-token steps on the static cache run the compiled language model."""
    from lcot.core import graph
    from lcot.core.latent import _COMPILED_STEP

    model, processor = loaded
    b = Collator(processor, model.config, 4, thought_images=True)(records[:3])
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager", **kw))
    with torch.no_grad():
        ref_h, ref_lat = latent_hidden_states(model, b, fast="off")
        graph.clear(model)
        monkeypatch.setenv(graph.COMPILE_ENV, "1")
        try:
            compiled = None
            h, lat = latent_hidden_states(model, b, fast="static")
            compiled, used = _COMPILED_STEP[model], []
            _COMPILED_STEP[model] = lambda **kw: used.append(1) or compiled(**kw)
            h2, lat2 = latent_hidden_states(model, b, fast="static")
        finally:
            graph.clear(model)
            _COMPILED_STEP.pop(model, None)
    assert compiled is not None and len(used) == 4  # the K latent steps, not the prefix or the suffix
    for got in (lat, lat2):
        torch.testing.assert_close(got, ref_lat, atol=5e-6, rtol=1e-5)
    m = b["attention_mask"].bool()
    torch.testing.assert_close(h[m], ref_h[m], atol=5e-6, rtol=1e-5)
