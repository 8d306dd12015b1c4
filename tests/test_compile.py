"""--compile and --compile_step: the language model's passes without a cache, and its one-token steps, run compiled
with the eager values (within rounding); checkpoints unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.latent import _COMPILED, RECOMPILE_LIMIT, compile_parallel_pass, compile_steps
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


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor's CPU backend compiles C++")
def test_inductor_step_keeps_the_eager_latents(loaded, records, monkeypatch):
    """--compile_step with inductor itself (fused C++ kernels on a CPU, Triton on a GPU; the attention of each step
    FlexAttention's, lcot.core.attention): the fused kernels round differently, so the latents are not
    bit-identical, but stay within a few fp32 ulps of the eager recurrence, the order of the eager path's own
    difference when a record is computed alone instead of in the batch (measured 9.5e-7 against 2.4e-7, latents of
    norm ~11; on an H100 in fp32 the compiled step was ten times closer)."""
    from lcot.core import attention, graph
    from lcot.core.latent import _COMPILED_STEP, compile_steps

    flex = []
    real_flex = attention.flex_rows
    monkeypatch.setattr(attention, "flex_rows", lambda *a: flex.append(1) or real_flex(*a))
    model, processor = loaded
    coll = Collator(processor, model.config, 6, thought_images=True)
    b = coll(records[:2])
    with torch.no_grad():
        _, ref = latent_hidden_states(model, b, fast="off")
        alone = torch.cat([latent_hidden_states(model, coll([r]), fast="off")[1] for r in records[:2]])
        graph.clear(model)
        compile_steps(model)
        compiled, used = _COMPILED_STEP[model], []
        _COMPILED_STEP[model] = lambda **kw: used.append(1) or compiled(**kw)
        try:
            _, got = latent_hidden_states(model, b, fast="static")
        finally:
            graph.clear(model)
            compile_steps(model, enable=False)
    assert len(used) == 6 and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and flex
    err, noise = (got - ref).abs().max().item(), (alone - ref).abs().max().item()
    assert err < 5e-6 and noise < 5e-6, (err, noise)  # latents of norm ~11: a few ulps
    assert err < 10 * max(noise, 1.2e-7), (err, noise)


def test_compile_step_flag_in_precompute_and_training(tiny_dir, data_dir, tmp_path, monkeypatch):
    """--compile_step: the precompute and training run their one-token steps through the compiled language model
    (here on the eager backend, on the static cache that LCOT_FAST=static gives a CPU), with the same latents."""
    from lcot.pipeline import train as cli
    from lcot.pipeline.data import read_records
    from lcot.pipeline.teacher import read_teacher, teacher_file
    from lcot.precompute_teacher_latents import main as precompute_main

    calls = []
    real = torch.compile

    def spy(module, **kw):
        compiled = real(module, backend="eager", **kw)
        return lambda **a: calls.append(type(module).__name__) or compiled(**a)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setenv("LCOT_FAST", "static")
    train = str(data_dir / "train.jsonl")
    common = ["--model_name_or_path", str(tiny_dir), "--train_jsonl", train, "--k_max", "3", "--bsz", "8",
              "--benefit_records", "0"]
    precompute_main([*common, "--output_dir", str(tmp_path / "eager")])
    assert not calls
    precompute_main([*common, "--output_dir", str(tmp_path / "compiled"), "--compile_step"])
    assert calls and set(calls) == {"Qwen2_5_VLTextModel"}
    for rec in read_records(train):
        a, b = (read_teacher(teacher_file(tmp_path / d, rec.idx), rec) for d in ("eager", "compiled"))
        torch.testing.assert_close(b, a, atol=5e-6, rtol=1e-5)
    calls.clear()
    cli.main(["--stage", "stage2", "--model_name_or_path", str(tiny_dir), "--train_jsonl", train, "--output_dir",
              str(tmp_path / "s2"), "--latent_size", "3", "--max_steps", "1", "--bsz", "4", "--grad_accum_steps", "1",
              "--align_weight", "0", "--latent_grad", "truncated", "--compile_step"])
    assert len(calls) == 3  # the three latent steps of the one training step's chain


def test_compile_step_setting(loaded, monkeypatch):
    """--compile_step: auto compiles a model's step when its first graphed FastLatents is made (a GPU), unless
    $LCOT_COMPILE_STEP=0; on compiles it at once; off never (unless $LCOT_COMPILE_STEP=1); nothing else is taken."""
    from lcot.core import graph
    from lcot.core.latent import _COMPILED_STEP

    model, _ = loaded
    monkeypatch.setattr(torch, "compile", lambda module, **kw: ("compiled", module))
    monkeypatch.delenv(graph.COMPILE_ENV, raising=False)
    try:
        graph.step_compile(model, "auto")
        assert model not in _COMPILED_STEP
        assert graph._compile_due(model, graphed=True) and not graph._compile_due(model, graphed=False)
        monkeypatch.setenv(graph.COMPILE_ENV, "0")
        assert not graph._compile_due(model, graphed=True)
        for setting in ("off", False):
            graph.step_compile(model, setting)
            monkeypatch.setenv(graph.COMPILE_ENV, "1")
            assert graph._compile_due(model, graphed=False)  # the variable compiles every FastLatents' step
            monkeypatch.delenv(graph.COMPILE_ENV)
            assert not graph._compile_due(model, graphed=True) and model not in _COMPILED_STEP
        for setting in ("on", True):
            graph.step_compile(model, setting)
            assert _COMPILED_STEP.pop(model) == ("compiled", model.model.language_model)
        graph.step_compile(model, "auto")
        graph._COMPILE_FAILED.add(model)  # a compiled step that failed is not compiled again
        assert not graph._compile_due(model, graphed=True)
        with pytest.raises(ValueError, match="compile_step must be one of"):
            graph.step_compile(model, "yes")
    finally:
        graph.step_compile(model, "off")
        graph._COMPILE_FAILED.discard(model)
        _COMPILED_STEP.pop(model, None)


def test_compile_step_flag_spellings():
    """The flag keeps its old spelling (`--compile_step` alone turns it on) and defaults to auto."""
    from lcot import config
    from lcot.pipeline.trainer import TrainConfig
    from lcot.precompute_teacher_latents import PrecomputeConfig

    base = ["--stage", "stage1", "--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o"]
    pre = ["--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o"]
    for cls, argv in ((TrainConfig, base), (PrecomputeConfig, pre)):
        got = [config.parse(cls, argv + extra, "p").compile_step
               for extra in ([], ["--compile_step"], ["--compile_step", "off"], ["--compile_step", "on"])]
        assert got == ["auto", "on", "off", "on"]


@pytest.mark.parametrize(("setting", "device", "env", "expected"), [
    ("auto", "cuda", {}, True), ("auto", "cpu", {}, False), ("off", "cuda", {}, False), ("on", "cuda", {}, True),
    ("on", "cpu", {}, False), ("on", "cpu", {"LCOT_FAST": "static"}, True),
    ("auto", "cuda", {"LCOT_FAST": "off"}, False), ("auto", "cuda", {"LCOT_FAST": "static"}, False),
    ("auto", "cuda", {"LCOT_COMPILE_STEP": "0"}, False),
    ("off", "cuda", {"LCOT_COMPILE_STEP": "1"}, True), (True, "cuda", {}, True), (False, "cuda", {}, False)])
def test_what_the_commands_say_before_a_run(monkeypatch, setting, device, env, expected):
    """step_compiles: whether a setting compiles the step on a device (the eager CPU chain never runs it)."""
    from lcot.core import graph

    for name in (graph.ENV, graph.COMPILE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert graph.step_compiles(setting, device) is expected


def test_training_says_when_it_compiles(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    """A run that will compile its step says so before it starts (here --compile_step on with the static-cache
    chain a CPU runs with LCOT_FAST=static; the eager backend); the default says so on a GPU only."""
    from lcot.core.graph import COMPILE_NOTE
    from lcot.pipeline import train as cli

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager", **kw))
    argv = ["--stage", "stage2", "--model_name_or_path", str(tiny_dir), "--train_jsonl", str(data_dir / "train.jsonl"),
            "--latent_size", "2", "--max_steps", "1", "--bsz", "2", "--grad_accum_steps", "1", "--align_weight", "0",
            "--latent_grad", "adjoint"]
    cli.main([*argv, "--output_dir", str(tmp_path / "default")])
    assert (COMPILE_NOTE in capsys.readouterr().err) == torch.cuda.is_available()
    monkeypatch.setenv("LCOT_FAST", "static")
    cli.main([*argv, "--output_dir", str(tmp_path / "on"), "--compile_step", "on"])
    err = capsys.readouterr().err
    assert COMPILE_NOTE in err and "--latent_grad adjoint) is compiled too" in err


@pytest.mark.parametrize("compile_fn", [compile_parallel_pass, compile_steps])
def test_compiling_raises_the_recompile_limit(loaded, compile_fn):
    """transformers' forward wrapper is one function for every model, so lcot's compiled passes (with and without
    gradients, each batch shape) count against one dynamo limit; at its default of 8, torch runs the ninth eagerly."""
    model, _ = loaded
    config = torch._dynamo.config  # set and restored by hand: monkeypatch's undo deletes a config entry
    old, config.recompile_limit = config.recompile_limit, 8
    try:
        compile_fn(model)
        assert config.recompile_limit == RECOMPILE_LIMIT == 64
    finally:
        compile_fn(model, enable=False)
        config.recompile_limit = old


def test_recompile_limit_under_its_old_name(monkeypatch):
    """torch before 2.7 (pyproject allows 2.6) names the limit cache_size_limit."""
    from types import SimpleNamespace

    from lcot.core.latent import allow_recompiles

    old = SimpleNamespace(cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", old)
    allow_recompiles()
    assert old.cache_size_limit == RECOMPILE_LIMIT and not hasattr(old, "recompile_limit")
