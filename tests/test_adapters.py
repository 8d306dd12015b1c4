"""LoRA adapters cast once for the latent chain (lcot.core.adapters): nothing changes but the kernels.

On the CPU under a bf16 autocast, as the trainer runs a --bf16 --lora model on a GPU: peft's adapters are fp32,
the base bf16; the chain with the casts kept (LCOT_CAST_ADAPTERS=1) must give the same bits as autocast's
per-call casts (=0).
"""

from __future__ import annotations

import pytest
import torch

from lcot.core.adapters import ENV, adapter_weights, autocast_adapters
from lcot.core.collate import Collator
from lcot.core.model import latent_hidden_states

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_bf16(tiny_dir, records):
    """A bf16 tiny model with fp32 LoRA adapters (peft's default), non-zero B, no dropout; a stage2 batch."""
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir, dtype=torch.bfloat16)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj|down_proj)")
    model = peft.get_peft_model(model, cfg).get_base_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)  # (peft starts B at zero: the adapters would add nothing)
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    return model, batch


def _latents(model, batch, monkeypatch, cast: str):
    monkeypatch.setenv(ENV, cast)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return latent_hidden_states(model.eval(), batch, grad="truncated", fast="static")


def test_adapters_are_fp32_and_change_the_output(lora_bf16, monkeypatch):
    model, batch = lora_bf16
    weights = adapter_weights(model)
    assert len(weights) == 2 * 4 * model.config.text_config.num_hidden_layers
    assert {p.dtype for p in weights} == {torch.float32}
    on = _latents(model, batch, monkeypatch, "1")[1]
    for m in model.modules():
        if hasattr(m, "enable_adapters") and hasattr(m, "lora_A"):
            m.enable_adapters(False)
    try:
        off = _latents(model, batch, monkeypatch, "1")[1]
    finally:
        for m in model.modules():
            if hasattr(m, "enable_adapters") and hasattr(m, "lora_A"):
                m.enable_adapters(True)
    assert (on - off).abs().max() > 1e-2  # the adapters matter here, so the next test can tell a difference


def test_kept_casts_give_the_bits_of_autocasts_casts(lora_bf16, monkeypatch):
    model, batch = lora_bf16
    hidden_cast, latents_cast = _latents(model, batch, monkeypatch, "1")
    hidden_auto, latents_auto = _latents(model, batch, monkeypatch, "0")
    assert torch.equal(latents_cast, latents_auto) and torch.equal(hidden_cast, hidden_auto)
    # without autocast the fp32 adapters' products are fp32: other values (what the casts must not be)
    monkeypatch.setenv(ENV, "1")
    with torch.no_grad():
        plain = latent_hidden_states(model, batch, grad="truncated", fast="static")[1]
    assert not torch.equal(plain, latents_auto)


def test_training_step_unchanged(lora_bf16, monkeypatch):
    """A truncated training step under autocast: same loss, same adapter gradients with and without the casts."""
    model, batch = lora_bf16
    model.train()
    results = []
    for cast in ("1", "0"):
        monkeypatch.setenv(ENV, cast)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden, latents = latent_hidden_states(model, batch, grad="truncated", fast="static")
        (hidden.float().square().mean() + latents.float().mean()).backward()
        results.append((hidden.detach(), [p.grad.clone() for p in adapter_weights(model)]))
    model.zero_grad(set_to_none=True)
    model.eval()
    (h1, g1), (h0, g0) = results
    assert torch.equal(h1, h0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g0, strict=True)) and any(g.abs().sum() > 0 for g in g1)


def test_weights_restored_casts_reused_and_off_where_it_does_not_apply(lora_bf16, monkeypatch):
    model, _ = lora_bf16
    weights = adapter_weights(model)
    before = [(p.data_ptr(), p.dtype, p.detach().clone()) for p in weights]
    monkeypatch.setenv(ENV, "1")
    seen = []
    for _ in range(2):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model) as n:
            assert n == len(weights)
            assert all(p.dtype == torch.bfloat16 for p in weights)
            assert torch.equal(weights[0], before[0][2].bfloat16())
            seen.append([p.data_ptr() for p in weights])
    assert seen[0] == seen[1]  # the same buffers each time: a CUDA graph of the chain stays valid
    assert [(p.data_ptr(), p.dtype) for p in weights] == [(a, d) for a, d, _ in before]
    assert all(torch.equal(p, v) for p, (_, _, v) in zip(weights, before, strict=True))
    with torch.no_grad(), autocast_adapters(model) as n:  # no autocast: nothing to cast
        assert n == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model) as n:  # gradients on
        assert n == 0
    monkeypatch.setenv(ENV, "0")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model) as n:
        assert n == 0
