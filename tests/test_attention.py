"""lcot.core.attention: single-token steps of grouped-query attention without repeat_kv's copies, the same values."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lcot.core import attention
from lcot.core.collate import Collator
from lcot.core.model import latent_hidden_states


def _qkv(b=2, heads=8, groups=2, q=1, s=13, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, heads, q, d, generator=g)
    key, value = torch.randn(b, groups, s, d, generator=g), torch.randn(b, groups, s, d, generator=g)
    mask = torch.rand(b, 1, q, s, generator=g) > 0.4
    mask[..., 0] = True
    return query, key, value, mask


def _module(heads=8, groups=2):
    m = torch.nn.Module().eval()
    m.num_key_value_groups, m.is_causal = heads // groups, False
    return m


def test_grouped_step_equals_sdpa_with_repeated_heads():
    query, key, value, mask = _qkv()
    ref, _ = sdpa_attention_forward(_module(), query, key, value, mask, scaling=0.25)
    out, _ = attention.step_sdpa(_module(), query, key, value, mask, scaling=0.25)
    assert out.shape == ref.shape == (2, 1, 8, 16)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # the eager form of the same mask
    torch.testing.assert_close(attention.step_sdpa(_module(), query, key, value, additive, scaling=0.25)[0], ref,
                               rtol=1e-6, atol=1e-6)
    swapped, _ = attention.step_sdpa(_module(), query, key.flip(1), value.flip(1), mask, scaling=0.25)
    assert (swapped - ref).abs().max() > 1e-2  # each query head reads its own key-value head


@pytest.mark.parametrize("case", ["several queries", "no mask", "no groups", "per-head mask", "dropout"])
def test_other_calls_go_to_transformers_sdpa(case, monkeypatch):
    heads, groups, q = (8, 8, 1) if case == "no groups" else (8, 2, 3 if case == "several queries" else 1)
    query, key, value, mask = _qkv(heads=heads, groups=groups, q=q)
    if case == "no mask":
        mask = None
    if case == "per-head mask":
        mask = mask.expand(2, heads, 1, mask.shape[-1])
    seen = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: seen.append(case) or ("stock", None))
    module = _module(heads, groups).train(case == "dropout")
    dropout = 0.1 if case == "dropout" else 0.0
    assert attention.step_sdpa(module, query, key, value, mask, dropout=dropout)[0] == "stock" and seen == [case]


def test_loaded_models_use_it_and_the_latents_do_not_change(tiny_dir, records, monkeypatch):
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir)
    text = model.config.text_config
    assert text._attn_implementation == attention.STEPS and text.num_key_value_heads < text.num_attention_heads
    calls = []
    real = attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    total = []
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.STEPS,
                        lambda *a, **k: total.append(1) or attention.step_sdpa(*a, **k))
    with torch.no_grad():
        hidden, latents = latent_hidden_states(model.eval(), batch, fast="static")
    layers = text.num_hidden_layers
    assert len(total) == 5 * layers and len(calls) == 2 * layers  # K=3 steps folded; prefix and suffix passes not
    text._attn_implementation = "sdpa"  # transformers' own path for every call
    with torch.no_grad():
        ref_hidden, ref_latents = latent_hidden_states(model, batch, fast="static")
    torch.testing.assert_close(latents, ref_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)


def test_stock_keeps_transformers_path_and_checkpoints_load_in_the_stock_class(tiny_dir, tmp_path, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lcot.pipeline.load import load

    monkeypatch.setenv(attention.ENV, "stock")
    assert load(tiny_dir)[0].config.text_config._attn_implementation == "sdpa"
    monkeypatch.setenv(attention.ENV, "other")
    with pytest.raises(ValueError, match="LCOT_STEP_ATTENTION"):
        load(tiny_dir)
    monkeypatch.delenv(attention.ENV)
    model, _ = load(tiny_dir)
    model.save_pretrained(tmp_path / "saved")
    assert attention.STEPS not in (tmp_path / "saved" / "config.json").read_text()
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert stock.config.text_config._attn_implementation == "sdpa"
