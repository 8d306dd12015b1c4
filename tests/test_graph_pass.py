"""--graph_pass: training's pass with gradients as CUDA graphs (lcot.fast.graph.GraphedPass, a Runner's
`graphed_pass`).

A CPU has no CUDA graphs, so these tests give GraphedPass a stand-in for make_graphed_callables
(`runner.graph_parallel(make=..., cuda_only=False)`) and check its logic: when a graph is made, reused, dropped or
refused, and that the values and gradients are the eager pass's.
The GPU check of the real graphs (graphed = eager in fp32) is in benchmarks/profile_step.py --check_graph_pass.
"""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.model import latent_hidden_states
from lcot.errors import LcotInputError
from lcot.fast import Runner
from lcot.fast.graph import GraphedPass
from lcot.pipeline.train import check
from lcot.pipeline.trainer import TrainConfig


class FakeMake:
    """make_graphed_callables' stand-in: records each capture's sample shapes, runs the module eagerly."""

    def __init__(self, fail: bool = False) -> None:
        self.samples: list[tuple] = []
        self.calls = 0
        self.fail = fail

    def __call__(self, module, sample, allow_unused_input=False):
        assert allow_unused_input  # the language model's token embedding takes no part in a pass on embeddings
        if self.fail:
            raise RuntimeError("capture refused")
        self.samples.append(tuple(t.shape for t in sample))
        assert all(isinstance(t, torch.Tensor) for t in sample) and module.training

        def run(*args):
            self.calls += 1
            return module(*args)
        return run


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, batch, grad: str, runner: Runner) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    hidden, lat = latent_hidden_states(model, batch, grad=grad, runner=runner)
    (hidden.pow(2).mean() + lat.sum()).backward()
    return hidden.detach(), _grads(model)


@pytest.fixture
def graphed(loaded):
    model, processor = loaded
    model.train()
    make = FakeMake()
    runner = Runner(model)  # fast="auto": the chain on the dynamic cache on a CPU
    runner.graph_parallel(make=make, cuda_only=False, keep=2)
    assert isinstance(runner.graphed_pass, GraphedPass) and runner.graphed_pass.runner is runner
    try:
        yield model, processor, make, runner
    finally:
        model.zero_grad()
        model.eval()


@pytest.mark.parametrize("grad", ["truncated", "bptt:1"])
def test_graphed_pass_gives_the_eager_values_and_gradients(graphed, records, grad):
    model, processor, make, runner = graphed
    gp = runner.graphed_pass
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    runner.graphed_pass = None
    ref_h, ref_g = _step(model, batch, grad, runner)
    runner.graphed_pass = gp
    h, g = _step(model, batch, grad, runner)
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    assert g.keys() == ref_g.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-6, rtol=1e-5, msg=name)
    # one capture, one replay: bptt:1's second pass comes before the first one's backward and runs eagerly
    assert gp.captures == 1 and make.calls == 1 and not gp.live and not runner.capture_errors


def test_graphs_are_kept_per_shape_reused_and_dropped(graphed, records):
    model, processor, make, runner = graphed
    gp = runner.graphed_pass
    collate = Collator(processor, model.config, 3, thought_images=True)
    batches = [collate(records[:2]), collate(records[:3]), collate(records[2:4]), collate(records[:1])]
    for b in batches:
        _step(model, b, "truncated", runner)
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    assert gp.captures == len(make.samples) == len(shapes) >= 3  # a capture per new shape, none when repeated
    assert make.calls == len(batches)
    assert len(gp.graphs) == 2  # keep=2: the oldest dropped
    assert [s[0][:2] for s in make.samples] == list(dict.fromkeys(tuple(b["input_ids"].shape) for b in batches))


def test_new_weights_drop_every_graph(graphed, records):
    model, processor, make, runner = graphed
    gp = runner.graphed_pass
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    _step(model, batch, "truncated", runner)
    w = model.model.language_model.layers[0].mlp.up_proj.weight
    old = w.data
    w.data = w.data.clone()  # a new address: a captured graph would read the old one
    try:
        _step(model, batch, "truncated", runner)
        assert gp.captures == 2
    finally:
        w.data = old


def test_where_a_graph_does_not_apply_the_pass_runs_eagerly(graphed, records):
    model, processor, make, runner = graphed
    gp = runner.graphed_pass
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    with torch.no_grad():
        latent_hidden_states(model, batch, grad="truncated", runner=runner)
    model.eval()
    latent_hidden_states(model, batch, grad="truncated", runner=runner)[0].sum().backward()
    model.train()
    assert gp.captures == 0 and make.calls == 0
    real = Runner(model, graph_pass=True).graphed_pass  # the real one (--graph_pass) on a CPU model: never captures
    assert isinstance(real, GraphedPass) and real.make is torch.cuda.make_graphed_callables
    assert real(torch.zeros(1, 2, 128), torch.ones(1, 1, 2, 2, dtype=torch.bool), torch.zeros(3, 1, 2)) is None


@pytest.mark.parametrize("grad", ["full", "adjoint"])
def test_full_and_adjoint_never_take_the_graph(graphed, records, grad):
    """full's passes run through a KV cache; adjoint's pass runs a second backward (its products), which a graph
    cannot: neither replays the graphed pass (what `check` says of --graph_pass with them)."""
    model, processor, make, runner = graphed
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    h, g = _step(model, batch, grad, runner)
    assert runner.graphed_pass.captures == 0 and make.calls == 0 and not make.samples
    assert len(g) > 10


def test_a_failed_capture_warns_once_and_runs_eagerly(loaded, records):
    model, processor = loaded
    model.train()
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    runner = Runner(model)
    ref_h, _ = _step(model, batch, "truncated", runner)
    runner.graph_parallel(make=FakeMake(fail=True), cuda_only=False)
    gp = runner.graphed_pass
    try:
        with pytest.warns(RuntimeWarning, match="capture refused"):
            h, _ = _step(model, batch, "truncated", runner)
        h2, _ = _step(model, batch, "truncated", runner)  # no second attempt, no second warning
    finally:
        model.eval()
    assert gp.failed and gp.captures == 0 and runner.capture_errors == [gp.failed]
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    torch.testing.assert_close(h2, ref_h, atol=0, rtol=0)


def _cfg(tmp_path, **extra) -> TrainConfig:
    return TrainConfig(stage="stage2", model_name_or_path=str(tmp_path / "m"), train_jsonl="x.jsonl",
                       output_dir=str(tmp_path / "out"), align_weight=0.0, graph_pass=True,
                       **{"latent_grad": "truncated", **extra})


@pytest.mark.parametrize("extra, said", [(dict(compile=True), "--compile"),
                                         (dict(gradient_checkpointing=True), "--gradient_checkpointing")])
def test_graph_pass_refuses_settings_it_cannot_serve(tmp_path, extra, said):
    with pytest.raises(LcotInputError, match=said):
        check(_cfg(tmp_path, **extra))


def test_graph_pass_with_the_full_gradient_says_it_does_nothing(tmp_path, capsys):
    check(_cfg(tmp_path))
    assert capsys.readouterr().err == ""
    check(_cfg(tmp_path, latent_grad="full"))  # e.g. an experiment's ablation row given --graph_pass for all rows
    assert "--graph_pass has nothing to graph with --latent_grad full" in capsys.readouterr().err
