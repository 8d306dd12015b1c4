"""LoRA adapters cast once for the latent chain (lcot.fast.adapters): nothing changes but the kernels.

On the CPU under a bf16 autocast, as the trainer runs a --bf16 --lora model on a GPU: peft's adapters are fp32,
the base bf16; the chain with the casts kept (a runner's cast_adapters=True) must give the same bits as
autocast's per-call casts (cast_adapters=False).
"""

from __future__ import annotations

import pytest
import torch

from lcot.core.model import latent_hidden_states
from lcot.fast import Runner
from lcot.fast.adapters import AdapterCasts, adapter_layers, adapter_weights, lora_layers, tuner_layers

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_bf16(tiny_dir, records):
    """A bf16 tiny model with fp32 LoRA adapters (peft's default), non-zero B, no dropout; a stage2 batch."""
    from conftest import lora_tiny

    return lora_tiny(tiny_dir, records, torch.bfloat16)


def _latents(model, batch, monkeypatch, cast: str):
    runner = Runner(model, fast="static", cast_adapters=cast == "1")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return latent_hidden_states(model.eval(), batch, grad="truncated", runner=runner)


def test_adapters_are_fp32_and_change_the_output(lora_bf16, monkeypatch):
    model, batch = lora_bf16
    weights = adapter_weights(model)
    n = 4 * model.config.text_config.num_hidden_layers  # q, v, gate, down in every layer
    layers = lora_layers(model)
    assert len(layers) == n and len(tuner_layers(model)) == n and len(adapter_layers(model)) == 2 * n
    assert all(name.endswith(("q_proj", "v_proj", "gate_proj", "down_proj")) for name, _ in layers)
    assert [name for name, _ in adapter_layers(model)] == [name for name, m in model.named_modules()
                                                          if ".lora_A." in name or ".lora_B." in name]
    assert len(weights) == 2 * n
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


def _chain_dtypes(model):
    """Record the dtype of one LoRA A layer's weight whenever it runs without gradients."""
    seen = []
    name, layer = next((n, m) for n, m in model.named_modules() if n.endswith(".lora_A.default"))
    hook = layer.register_forward_pre_hook(lambda m, _: seen.append(m.weight.dtype) if not torch.is_grad_enabled()
                                           else None)
    return seen, hook


def test_kept_casts_give_the_bits_of_autocasts_casts(lora_bf16, monkeypatch):
    model, batch = lora_bf16
    seen, hook = _chain_dtypes(model)
    try:
        hidden_cast, latents_cast = _latents(model, batch, monkeypatch, "1")
        assert seen[:4] == [torch.bfloat16] * 4  # the chain (prefix, 3 steps) read the casts, the pass after not
        seen.clear()
        hidden_auto, latents_auto = _latents(model, batch, monkeypatch, "0")
        assert set(seen) == {torch.float32}  # here autocast cast in every product
    finally:
        hook.remove()
    assert torch.equal(latents_cast, latents_auto) and torch.equal(hidden_cast, hidden_auto)
    # without autocast the fp32 adapters' products are fp32: other values (what the casts must not be)
    with torch.no_grad():
        plain = latent_hidden_states(model, batch, grad="truncated", runner=Runner(model, fast="static"))[1]
    assert not torch.equal(plain, latents_auto)


def _train_kwargs(batch, runner) -> dict:
    keys = ("input_ids", "attention_mask_4d", "position_ids", "pixel_values", "image_grid_thw", "labels",
            "latent_start", "num_latents")
    return {k: batch[k] for k in keys} | {"latent_mode": True, "grad": "truncated", "runner": runner,
                                         "return_logits": False}


def test_training_step_unchanged(lora_bf16, monkeypatch):
    """A truncated training step under autocast: same loss, same adapter gradients with and without the casts."""
    model, batch = lora_bf16
    model.train()
    seen, hook = _chain_dtypes(model)
    results = []
    try:
        for cast in (True, False):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(**_train_kwargs(batch, Runner(model, fast="static", cast_adapters=cast)))
                loss = out.loss + out.latent_hidden.float().mean()
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in adapter_weights(model)]))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32
    (l1, g1), (l0, g0) = results
    assert torch.equal(l1, l0)
    assert all(torch.equal(a, b) for a, b in zip(g1, g0, strict=True)) and any(g.abs().sum() > 0 for g in g1)


def test_ddp_keeps_reducing_the_adapter_gradients(lora_bf16, tmp_path, monkeypatch):
    """DDP hooks the parameters' gradient accumulators: the casts must leave the parameters themselves alone
    (changing a parameter's data to another dtype drops its accumulator, and DDP then waits forever)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model, batch = lora_bf16
    runner = Runner(model, fast="static")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model.train(), find_unused_parameters=False)
        reduced = []

        def count(state, bucket):  # DDP's all-reduce of a gradient bucket, here only counted
            reduced.append(bucket.buffer().numel())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done

        ddp.register_comm_hook(None, count)
        for i in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = ddp(**_train_kwargs(batch, runner))
            out.loss.backward()
            assert all(p.grad is not None for p in adapter_weights(model))
            # every iteration reduces all adapter gradients (with the parameters' data swapped: never, silently)
            assert sum(reduced) == (i + 1) * sum(p.numel() for p in adapter_weights(model))
            model.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
        model.eval()


def test_weights_restored_casts_reused_and_off_where_it_does_not_apply(lora_bf16, monkeypatch):
    model, _ = lora_bf16
    weights = adapter_weights(model)
    layers = [m for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n]
    before = [p.detach().clone() for p in weights]
    autocast_adapters = AdapterCasts()
    seen = []
    for _ in range(2):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model) as n:
            assert n == len(weights) == len(layers)
            casts = [m.weight for m in layers]
            assert all(c.dtype == torch.bfloat16 and not c.requires_grad for c in casts)
            assert torch.equal(casts[0], before[0].bfloat16())
            assert all(p.dtype == torch.float32 and p.requires_grad for p in weights)  # the originals untouched
            seen.append([id(c) for c in casts])
    assert seen[0] == seen[1]  # the same casts each time: a CUDA graph (or compiled step) of the chain stays valid
    assert [m.weight for m in layers] == weights  # the same parameter objects are back
    assert all(torch.equal(p, v) for p, v in zip(weights, before, strict=True))
    with pytest.raises(RuntimeError, match="inside"):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model):
            raise RuntimeError("inside")
    assert [m.weight for m in layers] == weights  # an error inside puts them back too
    with torch.no_grad(), autocast_adapters(model) as n:  # no autocast: nothing to cast
        assert n == 0
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast_adapters(model) as n:  # gradients on
        assert n == 0
    assert Runner(model, cast_adapters=False).casts is None  # a runner without them never swaps a parameter


def test_the_chains_graph_is_captured_once_across_training_steps(lora_bf16):
    """The casts are the same parameter objects every chain, so the (fake, CPU) CUDA graph of the step stays valid:
    one FastLatents, one capture, over three training steps under autocast."""
    from test_fast import fake_runner

    model, batch = lora_bf16
    runner = fake_runner(model)
    made, make = [], runner.fast_latents

    def counted(*args, **kwargs):
        fl = make(*args, **kwargs)
        if fl not in made:
            made.append(fl)
        return fl

    runner.fast_latents = counted
    model.train()
    try:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(**_train_kwargs(batch, runner))
            out.loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        model.eval()
    assert len(made) == 1 and made[0].captures == 1
