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
