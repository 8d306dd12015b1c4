"""--compile and --compile_step: the language model's passes without a cache, and its one-token steps, run compiled
with the eager values (within rounding); checkpoints unchanged."""

from __future__ import annotations

import shutil

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.latent import REFERENCE
from lcot.core.model import latent_hidden_states
from lcot.fast.runner import COMPILE_NOTE, RECOMPILE_LIMIT, Runner, allow_recompiles, compiles_step


def spy_on(runner: Runner, name: str) -> list:
    """Count the calls of the runner's compiled module `name` (_compiled_step or _compiled_pass)."""
    compiled, used = getattr(runner, name), []
    setattr(runner, name, lambda **kw: used.append(1) or compiled(**kw))
    return used


def test_compiled_parallel_pass_equals_eager(loaded, records, monkeypatch):
    model, processor = loaded
    b = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    calls = []
    real = torch.compile

    def spy(module, **kw):  # the real compile, on the eager backend (no C++ toolchain needed)
        calls.append(module)
        return real(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", spy)
    ref_h, ref_lat = latent_hidden_states(model, b, grad="truncated", runner=REFERENCE)
    keys = set(model.state_dict())
    runner = Runner(model, compile=True)
    try:
        assert calls == [model.model.language_model] and set(model.state_dict()) == keys
        used = spy_on(runner, "_compiled_pass")
        h, lat = latent_hidden_states(model, b, grad="truncated", runner=runner)
        assert len(used) == 1  # the pass with gradients; the prefix and the latent steps go through the cache
        torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lat, ref_lat, atol=1e-5, rtol=1e-5)
        h.pow(2).mean().backward()
        assert model.model.language_model.layers[0].mlp.down_proj.weight.grad is not None
    finally:
        model.zero_grad()
    runner.compile_parallel(enable=False)
    assert runner._compiled_pass is None


def test_compiled_static_steps_equal_the_reference(loaded, records, monkeypatch):
    """compile_step="on" with fast="static": the one-token steps on the static cache run the compiled language
    model, compiled when the runner's first static cache is made."""
    model, processor = loaded
    b = Collator(processor, model.config, 4, thought_images=True)(records[:3])
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager", **kw))
    runner = Runner(model, fast="static", compile_step="on")
    with torch.no_grad():
        ref_h, ref_lat = latent_hidden_states(model, b, runner=REFERENCE)
        assert runner._compiled_step is None  # compiled lazily, at the first static cache
        h, lat = latent_hidden_states(model, b, runner=runner)
        assert runner._compiled_step is not None
        used = spy_on(runner, "_compiled_step")
        h2, lat2 = latent_hidden_states(model, b, runner=runner)
    assert len(used) == 4  # the K latent steps, not the prefix or the suffix
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
    from lcot.fast import attention

    flex = []
    real_flex = attention.flex_rows
    monkeypatch.setattr(attention, "flex_rows", lambda *a: flex.append(1) or real_flex(*a))
    model, processor = loaded
    coll = Collator(processor, model.config, 6, thought_images=True)
    b = coll(records[:2])
    off = Runner(model, fast="off")
    with torch.no_grad():
        _, ref = latent_hidden_states(model, b, runner=off)
        alone = torch.cat([latent_hidden_states(model, coll([r]), runner=off)[1] for r in records[:2]])
        runner = Runner(model, fast="static", compile_step="on")
        runner._compile_step()
        compiled = runner._compiled_step
        used = spy_on(runner, "_compiled_step")
        _, got = latent_hidden_states(model, b, runner=runner)
    assert len(used) == 6 and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and flex
    err, noise = (got - ref).abs().max().item(), (alone - ref).abs().max().item()
    assert err < 5e-6 and noise < 5e-6, (err, noise)  # latents of norm ~11: a few ulps
    assert err < 10 * max(noise, 1.2e-7), (err, noise)


def test_compile_step_flag_in_precompute_and_training(tiny_dir, data_dir, tmp_path, monkeypatch):
    """--compile_step: the precompute and training run their one-token steps through the compiled language model
    (here on the eager backend, on the static cache that --fast static gives a CPU), with the same latents."""
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
    train = str(data_dir / "train.jsonl")
    common = ["--model_name_or_path", str(tiny_dir), "--train_jsonl", train, "--k_max", "3", "--bsz", "8",
              "--benefit_records", "0", "--fast", "static"]
    precompute_main([*common, "--output_dir", str(tmp_path / "eager")])
    assert not calls
    precompute_main([*common, "--output_dir", str(tmp_path / "compiled"), "--compile_step", "on"])
    assert calls and set(calls) == {"Qwen2_5_VLTextModel"}
    for rec in read_records(train):
        a, b = (read_teacher(teacher_file(tmp_path / d, rec.idx), rec) for d in ("eager", "compiled"))
        torch.testing.assert_close(b, a, atol=5e-6, rtol=1e-5)
    calls.clear()
    cli.main(["--stage", "stage2", "--model_name_or_path", str(tiny_dir), "--train_jsonl", train, "--output_dir",
              str(tmp_path / "s2"), "--latent_size", "3", "--max_steps", "1", "--bsz", "4", "--grad_accum_steps", "1",
              "--align_weight", "0", "--latent_grad", "truncated", "--fast", "static", "--compile_step", "on"])
    assert len(calls) == 3  # the three latent steps of the one training step's chain


def test_compile_step_setting(loaded, monkeypatch):
    """compile_step: auto compiles the step when the runner's first graphed static cache is made (a GPU); on compiles
    it at the first static cache; off never; a step whose compile failed is not compiled again."""
    model, _ = loaded
    monkeypatch.setattr(torch, "compile", lambda module, **kw: ("compiled", module))
    auto = Runner(model, compile_step="auto")
    assert auto._compile_due(graphed=True) and not auto._compile_due(graphed=False)
    for setting in ("off", False):
        off = Runner(model, compile_step=setting)
        assert not off._compile_due(graphed=True) and not off._compile_due(graphed=False)
    for setting in ("on", True):
        on = Runner(model, fast="static", compile_step=setting)
        assert on._compile_due(graphed=False)
        on.fast_latents(model, 1, 10)
        assert on._compiled_step == ("compiled", model.model.language_model) and not on._compile_due(graphed=True)
    auto.drop_compiled_step("RuntimeError: boom")  # a compiled step that failed is not compiled again
    assert not auto._compile_due(graphed=True) and auto.compile_errors == ["RuntimeError: boom"]
    with pytest.raises(ValueError, match="compile_step must be one of"):
        Runner(model, compile_step="yes")


def test_speed_flags_spellings():
    """Every command that runs latent passes takes the same two speed flags, with the same defaults."""
    from lcot import config
    from lcot.pipeline import train
    from lcot.pipeline.evaluate import EvaluateConfig
    from lcot.pipeline.generate import GenerateConfig
    from lcot.precompute_teacher_latents import PrecomputeConfig

    base = ["--stage", "stage1", "--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o"]
    pre = ["--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o"]
    gen = ["--model_name_or_path", "m", "--question", "q"]
    ev = ["--model_name_or_path", "m", "--eval_jsonl", "e"]
    parsers = [lambda a: train.parse(base + a)] + [
        (lambda a, cls=cls, argv=argv: config.parse(cls, argv + a, "p"))
        for cls, argv in ((PrecomputeConfig, pre), (GenerateConfig, gen), (EvaluateConfig, ev))]
    for parse in parsers:
        got = [(c.fast, c.compile_step) for c in map(parse, ([], ["--compile_step", "off", "--fast", "off"],
                                                               ["--compile_step", "on", "--fast", "static"]))]
        assert got == [("auto", "auto"), ("off", "off"), ("static", "on")]
        with pytest.raises(SystemExit):
            parse(["--fast", "fastest"])


@pytest.mark.parametrize(("fast", "setting", "device", "expected"), [
    ("auto", "auto", "cuda", True), ("auto", "auto", "cpu", False), ("auto", "off", "cuda", False),
    ("auto", "on", "cuda", True), ("auto", "on", "cpu", False), ("static", "on", "cpu", True),
    ("off", "auto", "cuda", False), ("static", "auto", "cuda", False), ("graph", "auto", "cuda", True),
    ("graph", "auto", "cpu", False), ("graph", "on", "cpu", True)])
def test_what_the_commands_say_before_a_run(fast, setting, device, expected):
    """compiles_step: whether a setting compiles the step on a device (the eager CPU chain never runs it)."""
    assert compiles_step(fast, setting, device) is expected


def test_training_says_when_it_compiles(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    """A run that will compile its step says so before it starts (here --compile_step on with the static-cache
    chain --fast static gives a CPU; the eager backend); the default says so on a GPU only."""
    from lcot.pipeline import train as cli

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="eager", **kw))
    argv = ["--stage", "stage2", "--model_name_or_path", str(tiny_dir), "--train_jsonl", str(data_dir / "train.jsonl"),
            "--latent_size", "2", "--max_steps", "1", "--bsz", "2", "--grad_accum_steps", "1", "--align_weight", "0",
            "--latent_grad", "adjoint"]
    cli.main([*argv, "--output_dir", str(tmp_path / "default")])
    assert (COMPILE_NOTE in capsys.readouterr().err) == torch.cuda.is_available()
    cli.main([*argv, "--output_dir", str(tmp_path / "on"), "--compile_step", "on", "--fast", "static"])
    err = capsys.readouterr().err
    assert COMPILE_NOTE in err and "--latent_grad adjoint) is compiled too" in err


@pytest.mark.parametrize("what", ["step", "pass"])
def test_compiling_raises_the_recompile_limit(loaded, what):
    """transformers' forward wrapper is one function for every model, so lcot's compiled passes (with and without
    gradients, each batch shape) count against one dynamo limit; at its default of 8, torch runs the ninth eagerly."""
    model, _ = loaded
    config = torch._dynamo.config  # set and restored by hand: monkeypatch's undo deletes a config entry
    old, config.recompile_limit = config.recompile_limit, 8
    try:
        runner = Runner(model, fast="static", compile_step="on")
        runner._compile_step() if what == "step" else runner.compile_parallel()
        assert config.recompile_limit == RECOMPILE_LIMIT == 64
    finally:
        config.recompile_limit = old


def test_recompile_limit_under_its_old_name(monkeypatch):
    """torch before 2.7 (pyproject allows 2.6) names the limit cache_size_limit."""
    from types import SimpleNamespace

    old = SimpleNamespace(cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", old)
    allow_recompiles()
    assert old.cache_size_limit == RECOMPILE_LIMIT and not hasattr(old, "recompile_limit")
