"""grad="adjoint" (lcot.core.adjoint): the full gradient of the latent chain without a recurrence with gradients,
checked against grad="full" (the dynamic-cache recurrence with gradients, the reference) in fp32."""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.loss import align_loss
from lcot.core.model import bptt_links, latent_hidden_states


def _grads(model, b, grad: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward values and parameter gradients of CE on the answer plus an alignment of every latent."""
    model.zero_grad(set_to_none=True)
    s, k = b["latent_start"], b["num_latents"]
    hidden, lat = latent_hidden_states(model, b, grad=grad)
    target = torch.linspace(-1, 1, lat.shape[-1], device=lat.device).expand_as(lat)
    ce = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, s + k:-1]).flatten(0, 1),
                                           b["input_ids"][:, s + k + 1:].flatten())
    (ce + align_loss(lat, target)[0]).backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return hidden.detach(), grads


def _largest_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize(("k", "thought"), [(1, False), (4, False), (3, True)])
def test_adjoint_gradient_is_the_full_gradient(loaded, records, k, thought):
    model, processor = loaded
    b = Collator(processor, model.config, k, thought_images=thought)(records[:2])
    h_full, g_full = _grads(model, b, "full")
    h_adj, g_adj = _grads(model, b, "adjoint")
    _, g_trunc = _grads(model, b, "truncated")
    torch.testing.assert_close(h_adj, h_full, atol=1e-5, rtol=1e-5)
    for a, c in zip(g_adj, g_full):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
    if k > 1:  # the chain carries gradient: the truncated one is another gradient, and adjoint is not it
        assert _largest_gap(g_trunc, g_full) > 100 * max(_largest_gap(g_adj, g_full), 1e-6)
    else:  # one slot: its input is the prefix's output, which the pass itself computes
        assert _largest_gap(g_trunc, g_full) > 1e-4


def test_adjoint_twice_in_a_row_and_without_gradients(loaded, records):
    """The graph it keeps for the backward pass is released: a second step gives the same gradients; under
    no_grad it is the truncated forward."""
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[2:4])
    _, first = _grads(model, b, "adjoint")
    _, second = _grads(model, b, "adjoint")
    assert _largest_gap(first, second) == 0
    with torch.no_grad():
        h_adj, lat_adj = latent_hidden_states(model, b, grad="adjoint")
        h_trunc, lat_trunc = latent_hidden_states(model, b, grad="truncated")
    assert torch.equal(h_adj, h_trunc) and torch.equal(lat_adj, lat_trunc)


def test_adjoint_with_gradient_checkpointing(tiny_dir, records):
    """The pass with gradients recomputed (checkpointing): still the full gradient of the model without it."""
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir)
    model.train()
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    _, g_full = _grads(model, b, "full")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, g_adj = _grads(model, b, "adjoint")
    for a, c in zip(g_adj, g_full):
        torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)


def test_adjoint_is_a_grad_mode():
    assert bptt_links("adjoint") is None
    with pytest.raises(ValueError, match="adjoint"):
        bptt_links("adjoint:2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs of the products need a GPU")
def test_graphed_products_equal_eager_ones_and_the_full_gradient(tiny_dir, records, monkeypatch):
    from lcot.core import adjoint
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir)
    model = model.cuda().eval()
    b = Collator(processor, model.config, 5, thought_images=True)(records[:2])
    b = {key: v.cuda() if torch.is_tensor(v) and key != "image_grid_thw" else v for key, v in b.items()}
    _, g_full = _grads(model, b, "full")
    before = len(adjoint.CAPTURED)
    _, g_graph = _grads(model, b, "adjoint")
    assert adjoint.CAPTURED[before:] == [5] and not adjoint.CAPTURE_ERRORS
    monkeypatch.setenv(adjoint.GRAPH_ENV, "0")
    _, g_eager = _grads(model, b, "adjoint")
    assert len(adjoint.CAPTURED) == before + 1
    for a, c, f in zip(g_graph, g_eager, g_full):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a, f, atol=2e-5, rtol=1e-4)
