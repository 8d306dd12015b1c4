"""lcot.fast.attention: single-token steps of grouped-query attention without repeat_kv's copies, the same values."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lcot.core.collate import Collator
from lcot.core.model import latent_hidden_states
from lcot.fast import Runner, attention


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


@pytest.mark.filterwarnings("ignore:.*without torch.compile")  # FlexAttention's unfused form: the same values
@pytest.mark.parametrize("s", [13, 128, 300])
def test_flex_rows_equal_sdpa(s):
    """FlexAttention over the query rows of each key-value head (every key block listed, the mask read per key)
    equals sdpa under the same mask row, also where the keys do not fill their last block."""
    query, key, value, mask = _qkv(s=s)
    rows = query.reshape(2, 2, 4, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=mask, scale=0.25)
    out = attention.flex_rows(rows, key, value, mask[:, 0, 0], 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    mask[:, :, :, -1] = ~mask[:, :, :, -1]  # the last key, in the last (partial) block, is read
    assert (attention.flex_rows(rows, key, value, mask[:, 0, 0], 0.25) - out).abs().max() > 1e-3


def _graphs_of(fn, *args):
    """fn compiled on a backend that keeps its FX graphs (and runs them as they are): (output, graphs' code)."""
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=keep)(*args), graphs


@pytest.mark.parametrize("flex", [True, False])
def test_compiled_steps_take_flex_attention(flex):
    """In a compiled step the grouped rows go to FlexAttention (flex=False, the runner's step_attention="sdpa": to
    sdpa), the same values."""
    query, key, value, mask = _qkv(s=200)
    ref, _ = attention.step_sdpa(_module(), query, key, value, mask, scaling=0.25)
    with torch.no_grad():  # as the chain runs its steps
        (out, _), graphs = _graphs_of(lambda *a: attention.step_sdpa(_module(), *a, scaling=0.25, flex=flex), query,
                                      key, value, mask)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert any("flex_attention" in code for code in graphs) == flex
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # a float mask: sdpa's kernel
    with torch.no_grad():
        (out, _), graphs = _graphs_of(lambda *a: attention.step_sdpa(_module(), *a, scaling=0.25), query, key,
                                      value, additive)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert not any("flex_attention" in code for code in graphs)
    with torch.enable_grad():  # a pass with gradients (its block mask has no backward): sdpa's kernel
        (out, _), graphs = _graphs_of(lambda *a: attention.step_sdpa(_module(), *a, scaling=0.25),
                                      query.requires_grad_(), key, value, mask)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert not any("flex_attention" in code for code in graphs)


@pytest.mark.parametrize("grad", [False, True])
def test_compiled_steps_with_gradients_keep_sdpa(grad, monkeypatch):
    """Inside torch.compile a single-token pass goes to FlexAttention only without gradients: its block mask has no
    query blocks, so no backward (the adjoint's pass over a single slot, K=2, runs with them)."""
    query, key, value, mask = _qkv(s=200)
    used = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(attention, "flex_rows", lambda *a: used.append(1) or torch.zeros(2, 2, 4, 16))
    with torch.set_grad_enabled(grad):
        attention.step_sdpa(_module(), query.requires_grad_(grad), key, value, mask, scaling=0.25)
    assert bool(used) != grad


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
        hidden, latents = latent_hidden_states(model.eval(), batch, runner=Runner(model, fast="static"))
    layers = text.num_hidden_layers
    assert len(total) == 5 * layers and len(calls) == 2 * layers  # K=3 steps folded; prefix and suffix passes not
    text._attn_implementation = "sdpa"  # transformers' own path for every call
    with torch.no_grad():
        ref_hidden, ref_latents = latent_hidden_states(model, batch, runner=Runner(model, fast="static"))
    torch.testing.assert_close(latents, ref_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)


def test_stock_keeps_transformers_path_and_checkpoints_load_in_the_stock_class(tiny_dir, tmp_path, monkeypatch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lcot.pipeline.load import load

    assert load(tiny_dir, step_attention="stock")[0].config.text_config._attn_implementation == "sdpa"
    assert load(tiny_dir, step_attention="sdpa")[0].config.text_config._attn_implementation == attention.STEPS_SDPA
    from lcot.config import SpeedConfig

    assert load(tiny_dir, speed=SpeedConfig(fast="off"))[0].config.text_config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="step_attention must be flex, sdpa or stock"):
        load(tiny_dir, step_attention="other")
    model, _ = load(tiny_dir)
    model.save_pretrained(tmp_path / "saved")
    assert attention.STEPS not in (tmp_path / "saved" / "config.json").read_text()
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert stock.config.text_config._attn_implementation == "sdpa"


@pytest.mark.gpu  # FlexAttention's GPU kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,groups,s", [(16, 2, 1024), (28, 4, 1024), (16, 2, 1000)])  # 3B, 7B; a partial block
@torch.no_grad()  # as the chain runs its steps (with gradients: sdpa, test_compiled_steps_with_gradients_keep_sdpa)
def test_compiled_flex_step_in_a_cuda_graph(dtype, heads, groups, s, monkeypatch):
    """The compiled step's attention on the GPU, at the 3B and 7B shapes (head dim 128, a cache of 1,024 slots),
    captured in a CUDA graph and replayed with new mask rows, keys and values: sdpa's values each time."""
    used = []
    real = attention.flex_rows
    monkeypatch.setattr(attention, "flex_rows", lambda *a: used.append(1) or real(*a))
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    b, d = 2, 128
    bufs = [torch.randn(b, heads, 1, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(b, groups, s, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(b, groups, s, d, device="cuda", dtype=dtype, generator=g),
            torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.bool)]
    module = _module(heads, groups)
    step = torch.compile(lambda q, k, v, m: attention.step_sdpa(module, q, k, v, m)[0])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}

    def refill(n: int) -> None:  # the first n slots written, some of them padding
        for buf in bufs[:3]:
            buf.normal_(generator=g)
        bufs[3].zero_()
        bufs[3][..., :n] = torch.rand(b, 1, 1, n, device="cuda", generator=g) > 0.2
        bufs[3][..., n - 1] = True

    refill(900)
    for _ in range(2):  # compile and warm up outside the capture
        step(*bufs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*bufs)
    assert used  # FlexAttention's kernel, not sdpa's
    for n in (900, 901, 300, s):
        refill(n)
        graph.replay()
        ref, _ = sdpa_attention_forward(module, *bufs)
        torch.testing.assert_close(out, ref, **tol)
