"""One dataclass per command: argparse, lcot.json and the resume check all come from it (training's is a
transformers.TrainingArguments)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import pytest
from transformers import TrainingArguments

from lcot import config
from lcot.config import option
from lcot.pipeline.trainer import TrainConfig


@dataclass
class Demo:
    path: str = option(help="a required path")
    num_latents: int = option(32, "K", flag="latent_size", saved=True, resume=True)
    ks: list[int] | None = option(None, "several K")
    image: list[str] = option([], "repeatable")
    mode: str = option("a", "a mode", choices=("a", "b"), aliases=("--style",))
    target: str = option("", "needed although it has a default", required=True)
    resume: str | None = option(None, "a folder, or the last one", const="last")
    fast: bool = option(False, "a switch", saved=True)


def test_parser_follows_the_dataclass(capsys):
    cfg = config.parse(Demo, ["--path", "p", "--latent_size", "4", "--ks", "1", "2", "--image", "a", "--image", "b",
                              "--style", "b", "--target", "t", "--resume", "--fast"], "demo")
    assert cfg == Demo(path="p", num_latents=4, ks=[1, 2], image=["a", "b"], mode="b", target="t", resume="last",
                       fast=True)
    assert config.parse(Demo, ["--path", "p", "--target", "t"], "demo") == Demo(path="p", target="t")
    with pytest.raises(SystemExit):
        config.parse(Demo, ["--path", "p"], "demo")  # --target is required
    with pytest.raises(SystemExit):
        config.parse(Demo, ["--path", "p", "--target", "t", "--mode", "c"], "demo")
    help_text = config.parser(Demo, "demo").format_help()
    assert "--latent_size LATENT_SIZE" in help_text and "(default: 32)" in help_text
    assert "--num_latents" not in help_text
    assert config.saved(Demo(path="p", target="t")) == {"num_latents": 32, "fast": False}
    assert [f.name for f in config.resume_keys(Demo)] == ["num_latents"]


def test_train_config_is_the_cli_lcot_json_and_resume_check():
    from lcot.pipeline import train

    p = train.parser()
    flags = {a.dest: a.option_strings for a in p._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in fields(TrainConfig)}  # one field, one flag: nothing re-declared by hand
    ta = {f.name for f in fields(TrainingArguments)}
    assert {"learning_rate", "warmup_steps", "report_to", "bf16", "seed", "max_steps"} <= ta & set(flags)
    for name, seed in (("num_latents", "--latent_size"), ("num_train_epochs", "--epochs"),
                       ("per_device_train_batch_size", "--bsz"), ("gradient_accumulation_steps", "--grad_accum_steps")):
        assert seed in flags[name], name  # the seed's spelling
    cfg = train.parse(["--stage", "stage2", "--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o",
                       "--latent_size", "4", "--epochs", "2", "--bsz", "3", "--grad_accum_steps", "5",
                       "--resume_from_checkpoint"])
    assert (cfg.num_latents, cfg.num_train_epochs, cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps, cfg.resume_from_checkpoint) == (4, 2.0, 3, 5, "last")
    assert isinstance(cfg, TrainingArguments) and cfg.train_batch_size == 3  # the Trainer's args themselves
    defaults = train.parse(["--stage", "stage1", "--model_name_or_path", "m", "--train_jsonl", "t",
                            "--output_dir", "o"])
    assert (defaults.num_latents, defaults.learning_rate, defaults.gradient_accumulation_steps,
            defaults.remove_unused_columns, defaults.data_seed) == (32, 1e-5, 8, False, 42)
    lcot_flags = [a for a in p._actions if a.dest in flags and a.dest not in ta]
    assert lcot_flags and all(a.help and not a.help.startswith("(") for a in lcot_flags)
    with pytest.raises(SystemExit):
        train.parse(["--stage", "stage1", "--model_name_or_path", "m", "--train_jsonl", "t"])  # --output_dir
    assert set(TrainConfig.SAVED) >= {"stage", "num_latents", "align", "latent_grad", "latent_feed", "seed", "lora",
                                      "latent_curriculum"}
    assert set(TrainConfig.RESUME) == {
        "stage", "num_latents", "latent_feed", "align", "latent_grad", "latent_curriculum", "seed", "lora"}
    assert set(TrainConfig.SAVED) | set(TrainConfig.RESUME) <= set(flags)


def test_latent_grad_values_are_checked_before_loading(tmp_path):
    from lcot.errors import LcotInputError
    from lcot.pipeline import train

    base = dict(stage="stage1", model_name_or_path=str(tmp_path / "m"), train_jsonl="t", output_dir=str(tmp_path / "o"))
    train.check(TrainConfig(**base, latent_grad="bptt:2"))
    with pytest.raises(LcotInputError, match="bptt:M"):
        train.check(TrainConfig(**base, latent_grad="bptt:two"))


def test_adjoint_is_checked_against_fsdp_and_notes_compile_flags(tmp_path, monkeypatch, capsys):
    from lcot.errors import LcotInputError
    from lcot.pipeline import train

    base = dict(stage="stage2", model_name_or_path=str(tmp_path / "m"), train_jsonl="t", output_dir=str(tmp_path / "o"),
                align_weight=0.0, latent_grad="adjoint")
    train.check(TrainConfig(**base, gradient_checkpointing=True))  # the full gradient with checkpointing
    with pytest.raises(LcotInputError, match="--latent_grad adjoint"):
        train.check(TrainConfig(**{**base, "latent_grad": "full"}, gradient_checkpointing=True))
    train.check(TrainConfig(**base, compile=True))
    assert "--compile has no effect on the pass with gradients of --latent_grad adjoint" in capsys.readouterr().err
    train.check(TrainConfig(**base, compile_step="on"))
    assert "--compile_step" not in capsys.readouterr().err  # adjoint's chain runs without gradients: it applies
    train.check(TrainConfig(**{**base, "latent_grad": "full"}, compile_step="on"))
    assert "--compile_step has no effect here (--latent_grad full" in capsys.readouterr().err
    train.check(TrainConfig(**base, compile_step="on", latent_feed="pause"))
    assert "--compile_step has no effect here (--latent_feed pause" in capsys.readouterr().err
    train.check(TrainConfig(**{**base, "stage": "stage1", "latent_grad": "truncated"}, compile_step="on",
                            num_latents=0))
    assert "--compile_step has no effect here (--latent_size 0" in capsys.readouterr().err
    train.check(TrainConfig(**{**base, "latent_grad": "full"}))  # the default (auto) says nothing
    assert "--compile_step" not in capsys.readouterr().err
    train.check(TrainConfig(**base, graph_pass=True))
    assert "--graph_pass has nothing to graph with --latent_grad adjoint (it runs a second backward" in \
        capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LcotInputError, match="adjoint is not supported with FSDP"):
        train.check(TrainConfig(**base))


def test_resume_refuses_another_k_also_from_a_checkpoint_written_before_the_rename(tmp_path):
    import json

    from lcot.errors import LcotInputError
    from lcot.pipeline import train
    from lcot.pipeline.runs import read_lcot_config

    ckpt = tmp_path / "o" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "lcot.json").write_text(json.dumps({"stage": "stage1", "latent_size": 16}))
    assert read_lcot_config(ckpt)["num_latents"] == 16
    cfg = dict(stage="stage1", model_name_or_path="m", train_jsonl="t", output_dir=str(tmp_path / "o"),
               resume_from_checkpoint=str(ckpt))
    assert train.resume_point(TrainConfig(**cfg, num_latents=16)) == str(ckpt)
    with pytest.raises(LcotInputError, match="--latent_size 16"):
        train.resume_point(TrainConfig(**cfg, num_latents=32))


def test_generate_keeps_its_short_k_flag():
    from lcot.pipeline.generate import GenerateConfig

    cfg = config.parse(GenerateConfig, ["--model_name_or_path", "m", "--question", "q", "-k", "4"], "g")
    assert cfg.num_latents == 4


def test_build_folder_keeps_a_folder_another_process_finished_meanwhile(tmp_path):
    from lcot.io import build_folder

    out = tmp_path / "data"

    def build(tmp):  # meanwhile, another process completes the same folder
        (tmp / "mine.txt").write_text("ours")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    build_folder(out, build, same_as_ours=lambda found: (found / "theirs.txt").is_file())
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # our temporary folder is gone
    build_folder(out, lambda tmp: (tmp / "new.txt").write_text("new"))  # replacing: the old one moves aside
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["data"]
