"""What the commands print and leave behind: --help of every CLI, a stage's compact console output,
metrics in TensorBoard through the Trainer, no extra checkpoint at the last step, generate's short form, and
the Makefile's lab / tensorboard / clean / test targets (dry runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcot import config
from lcot.core.tokens import LATENT_END, LATENT_PAD, LATENT_START
from lcot.pipeline.runs import METRICS_FILE, read_metrics

ROOT = Path(__file__).parents[1]
FAST = ["--bsz", "2", "--grad_accum_steps", "1", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "3e-3"]


def parsers():
    """Every command's parser, by its command line."""
    from lcot.demo import DemoConfig
    from lcot.experiment import PROG, MeasureConfig
    from lcot.experiment import parser as experiment
    from lcot.pipeline.evaluate import parser as evaluate
    from lcot.pipeline.generate import GenerateConfig
    from lcot.pipeline.train import parser as train
    from lcot.precompute_teacher_latents import parser as precompute
    from lcot.toy.synthetic import SyntheticConfig
    from lcot.toy.tiny import TinyConfig

    return {"python -m lcot.main": train(), "python -m lcot.precompute_teacher_latents": precompute(),
            "python -m lcot.pipeline.generate": config.parser(GenerateConfig, "g"),
            "python -m lcot.pipeline.evaluate": evaluate(), "python -m lcot.experiment": experiment(),
            f"{PROG} measure": config.parser(MeasureConfig, "m"), "python -m lcot.demo": config.parser(DemoConfig, "d"),
            "python -m lcot.toy.synthetic": config.parser(SyntheticConfig, "s"),
            "python -m lcot.toy.tiny": config.parser(TinyConfig, "t")}


def test_every_flag_of_every_cli_has_help_and_shows_its_default():
    for prog, p in parsers().items():
        text = "".join(p.format_help().split())  # argparse formats every help string (a stray % fails here)
        for action in p._actions:
            if action.dest == "help":
                continue
            where = f"{prog} {action.option_strings[0]}"
            assert action.help and action.help.strip(), f"{where}: no help"
            if prog == "python -m lcot.main" and not action.required:  # HfArgumentParser: the formatter adds it
                assert "".join(f"(default: {action.default})".split()) in text, where
            elif not action.required:
                d = action.default
                shown = (" ".join(map(str, d)) or "none") if isinstance(d, list) else '""' if d == "" else str(d)
                assert action.help.replace("%%", "%").endswith(f"(default: {shown})"), where
                assert "".join(f"(default: {shown})".split()) in text, where  # as wrapped in --help


def test_a_bool_and_a_list_flag_show_their_defaults():
    from lcot.experiment import ExperimentConfig

    p = config.parser(ExperimentConfig, "e")
    help_of = {a.dest: a.help for a in p._actions}
    assert help_of["dry_run"].endswith("(default: False)")
    assert help_of["rows"].endswith(f"(default: {' '.join(config.parse(ExperimentConfig, ['--name', 'x'], 'e').rows)})")
    for prog in ("python -m lcot.main", "python -m lcot.demo", "python -m lcot.experiment"):
        assert "-v" in parsers()[prog]._option_string_actions, prog


# -- one stage: compact output, tensorboard, no final checkpoint ---------------------------------------------
@pytest.fixture(scope="module")
def teacher(data_dir, tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """8 records (absolute image paths) and their teacher latents, k_max 3."""
    from lcot.precompute_teacher_latents import main as precompute_main

    d = tmp_path_factory.mktemp("terminal")
    lines = []
    for line in (data_dir / "train.jsonl").read_text().splitlines()[:8]:
        r = json.loads(line)
        for key in ("question_image_paths", "thought_image_paths"):
            r[key] = [str(data_dir / p) for p in r[key]]
        lines.append(json.dumps(r))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    precompute_main([str(a) for a in ["--model_name_or_path", tiny_dir, "--train_jsonl", d / "train.jsonl",
                                      "--output_dir", d / "teacher", "--k_max", "3", "--bsz", "4",
                                      "--benefit_records", "0"]])
    return {"jsonl": d / "train.jsonl", "teacher": d / "teacher"}


def stage2(tiny_dir, teacher, out, *extra) -> list[str]:
    return [str(a) for a in ["--stage", "stage2", "--model_name_or_path", tiny_dir, "--train_jsonl", teacher["jsonl"],
                             "--output_dir", out, "--latent_size", "3", "--teacher_latent_dir", teacher["teacher"],
                             *FAST, *extra]]


def test_stage2_prints_a_header_a_bar_and_loss_lines_and_reports_to_tensorboard(tiny_dir, teacher, tmp_path,
                                                                                 capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lcot.main import main as train_main

    out = tmp_path / "s2"
    capsys.readouterr()
    train_main(stage2(tiny_dir, teacher, out, "--max_steps", "3", "--save_steps", "1", "--report_to", "tensorboard"))
    printed = capsys.readouterr()
    # stdout: the header, one loss line per logged step here (3 steps, fewer than ten lines), the closing lines
    assert printed.out.splitlines()[0] == f"stage2 · 8 records · K=3 · 3 steps of 2 records (0.75 epochs) -> {out}"
    lines = [line for line in printed.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    rows = read_metrics(out)
    assert lines[0] == f"step 1/3  ce {rows[0]['ce']:.4g}  align {rows[0]['align']:.3g}  cos {rows[0]['cos']:.3f}"
    assert re.search(r"^stage2: 3 steps in \d+ s, mean loss [\d.]+$", printed.out, re.M)
    assert "{'loss'" not in printed.out + printed.err  # Trainer's dicts are gone
    assert "stage2:" not in printed.err  # no bar into a pipe or file (capsys): the loss lines show the progress
    assert "new PAD/BOS/EOS" not in printed.err and "non_blocking" not in printed.err
    # no checkpoint-3 next to the final model; the ones before it stay for resume
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "model.safetensors").is_file()
    # the event file: CE, alignment, cosine (mean and per position), K at every logged step, as in the metrics
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/align", "train/cos", "train/k", "train/cos_pos1", "train/cos_pos2",
            "train/cos_pos3", "train/loss"} <= tags
    for tag, key in (("train/ce", "ce"), ("train/align", "align"), ("train/k", "k")):
        assert [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] == [
            (r["step"], round(r[key], 5)) for r in rows], tag
    assert [round(e.value, 5) for e in acc.Scalars("train/cos_pos2")] == [
        round(r["cos_per_position"][1], 5) for r in rows]
    # the metrics file is unchanged: no per-position scalars in it
    assert not any(k.startswith("cos_pos") for r in rows for k in r)
    assert all(json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines())


def test_save_final_checkpoint_and_verbose_bring_back_transformers_behaviour(tiny_dir, teacher, tmp_path, capsys):
    from lcot.main import main as train_main

    out = tmp_path / "s2"
    capsys.readouterr()
    train_main(stage2(tiny_dir, teacher, out, "--max_steps", "2", "--save_steps", "5", "--save_final_checkpoint",
                      "-v"))
    printed = capsys.readouterr()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "'loss'" in printed.out + printed.err  # Trainer's own print of each log
    assert not (out / "runs").exists()  # --report_to none: no event files


def test_an_unknown_or_missing_tracker_is_an_input_error():
    from lcot.errors import LcotInputError
    from lcot.pipeline.train import report_to

    assert report_to("none") == [] and report_to("tensorboard") == ["tensorboard"]
    with pytest.raises(LcotInputError, match="--report_to: nosuchtracker is not installed"):
        report_to("tensorboard,nosuchtracker")


def test_bars_are_labelled_redraw_rarely_into_a_pipe_and_the_stage_bar_shows_in_a_terminal(monkeypatch, capsys):
    from types import SimpleNamespace

    from lcot import console
    from lcot.pipeline.trainer import ConsoleCallback, TrainConfig

    bar = console.progress(range(3), desc="x")  # capsys: not a terminal
    assert bar.mininterval == console.PIPE_REDRAW_S and not bar.disable
    assert console.progress(total=3, desc="x", in_pipe=False).disable
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cfg = TrainConfig(stage="stage3", model_name_or_path="m", train_jsonl="t", output_dir="o", num_latents=4)
    cb = ConsoleCallback(cfg, 48)
    args = SimpleNamespace(train_batch_size=4, gradient_accumulation_steps=2, world_size=1, output_dir="o")
    state = SimpleNamespace(is_world_process_zero=True, max_steps=30, logging_steps=2, global_step=0)
    capsys.readouterr()
    cb.on_train_begin(args, state, None)
    assert cb.bar.mininterval == 0.1 and not cb.bar.disable and cb.every == 4  # ceil(30 / 10 / 2) logs a line
    for step in range(1, 31):
        state.global_step = step
        cb.on_step_end(args, state, None)
        if step % 2 == 0:
            cb.on_log(args, state, None, logs={"loss": 1.0, "ce": 1.0, "k": 2.0})
    cb.on_log(args, state, None, logs={"train_runtime": 3.2, "train_loss": 1.0})
    cb.on_train_end(args, state, None)
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [
        "stage3 · 48 records · K=1..4 · 30 steps of 8 records (5 epochs) -> o",
        *[f"step {i}/30  ce 1  K 2" for i in (4, 8, 12, 16, 20, 24, 28, 30)], "stage3: 30 steps in 3 s, mean loss 1"]
    assert "stage3: 100%" in printed.err and "30/30" in printed.err  # the labelled bar, on stderr


def test_the_loss_line_shows_stage3s_mean_k():
    from lcot.pipeline.trainer import loss_line

    logs = {"loss": 2.5, "ce": 1.23456, "align": 0.00412, "cos": 0.99612, "k": 2.5}
    assert loss_line(logs, 40, 96, k=True) == "step 40/96  ce 1.235  align 0.00412  cos 0.996  K 2.5"
    assert loss_line({"loss": 0.5, "ce": 0.5, "k": 4.0}, 1, 2) == "step 1/2  ce 0.5"
    assert loss_line({"loss": 0.5, "k": 4.0}, 2, 2) == "step 2/2  loss 0.5"


def test_experiment_v_makes_its_training_jobs_verbose_without_changing_the_plan(tmp_path, capsys):
    import lcot.experiment as E

    argv = ["--name", "v", "--task", "hops", "--n", "20", "--seeds", "1", "--rows", "pause", "--dry_run",
            "--run_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path / "results")]
    for extra, verbose in (([], False), (["-v"], True)):  # the same run folder: -v is not part of the plan
        capsys.readouterr()
        E.run_experiment(E.config.parse(E.ExperimentConfig, [*argv, *extra], "x"))
        lines = capsys.readouterr().out.splitlines()
        training = [line for line in lines if " python -m lcot.main " in line]
        assert len(training) >= 4 and all(line.endswith(" --verbose") == verbose for line in training)
        assert not any("--verbose" in line for line in lines if line not in training)


# -- generate: K latents counted, not spelled out ------------------------------------------------------------
def test_generate_prints_the_latents_counted_and_the_raw_form_with_raw(tiny_dir, tmp_path, capsys):
    from lcot.pipeline.generate import Generation
    from lcot.pipeline.generate import main as generate_main

    g = Generation(0, 32, "\n7", torch.zeros(32, 4))
    assert g.short == f"{LATENT_START}[32 latents]{LATENT_END} 7"
    assert g.text == f"{LATENT_START}{LATENT_PAD * 32}{LATENT_END}\n7"
    argv = ["--model_name_or_path", str(tiny_dir), "--question", "How many?", "-k", "5", "--max_new_tokens", "3",
            "--device", "cpu", "--output", str(tmp_path / "g.jsonl")]
    capsys.readouterr()
    generate_main(argv)
    printed = capsys.readouterr()
    first = printed.out.splitlines()[0]
    assert first.startswith(f"[0] {LATENT_START}[5 latents]{LATENT_END} ") and LATENT_PAD not in printed.out
    assert f"wrote {tmp_path / 'g.jsonl'}" in printed.out and "wrote" not in printed.err
    row = json.loads((tmp_path / "g.jsonl").read_text())
    assert row["output"].startswith(LATENT_START + LATENT_PAD * 5 + LATENT_END)  # the file keeps the raw text
    generate_main([*argv, "--raw"])
    assert capsys.readouterr().out.startswith(f"[0] {LATENT_START}{LATENT_PAD * 5}{LATENT_END}")


# -- Makefile ----------------------------------------------------------------------------------------------
# under `make test` a nested make prints "Entering directory" lines unless told not to
MAKE = ["make", "--no-print-directory"]


def make(*args: str, env: dict | None = None) -> str:
    """`make -n` (a dry run: prints the commands) in a copy of the Makefile; setup counts as done."""
    done = subprocess.run([*MAKE, "-n", "-f", str(ROOT / "Makefile"), "-o", ".venv/.lcot-installed", *args],
                          cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_lab_passes_args_allows_root_and_keeps_the_users_jupyter_settings():
    cmd = make("lab", "ARGS=--no-browser --port 8899").strip()
    root = os.getuid() == 0
    assert cmd == ("-m jupyter lab --notebook-dir=notebooks " + ("--allow-root " if root else "") +
                   "--no-browser --port 8899").join([".venv/bin/python ", ""])
    assert "JUPYTER" not in cmd and "IPYTHONDIR" not in cmd
    # nothing exported to every target redirects Jupyter or IPython (only `make test` isolates them)
    shell = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_", "IPYTHONDIR"))}  # a user's shell
    env = subprocess.run([*MAKE, "-s", "-f", str(ROOT / "Makefile"), "-o", ".venv/.lcot-installed", "lab",
                          "PY=env; true"], cwd=ROOT, capture_output=True, text=True, check=True, env=shell).stdout
    assert "HF_HUB_OFFLINE=1" in env  # the trick works: `env` printed what the lab command would see
    assert not [line for line in env.splitlines() if line.startswith(("JUPYTER_", "IPYTHONDIR="))
                and "runs/.cache" in line]
    test = make("test").splitlines()
    assert all(f"JUPYTER_CONFIG_DIR={ROOT}/runs/.cache/jupyter" in line for line in test if "pytest" in line)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_tensorboard_and_clean(tmp_path):
    assert make("tensorboard", "ARGS=--port 6007").strip() == ".venv/bin/python -m tensorboard.main --logdir runs/ " \
                                                               "--port 6007"
    # clean, for real, on a copy: run folders go, runs/.cache (the caches, Jupyter's folders) stays
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for d in ("runs/demo/stage2", "runs/.cache/jupyter-data/lab/workspaces", "runs/experiments/x"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs" / "notes.txt").write_text("x")
    subprocess.run([*MAKE, "-s", "clean"], cwd=tmp_path, check=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".cache"]
    assert (tmp_path / "runs/.cache/jupyter-data/lab/workspaces").is_dir()


def test_generate_and_evaluate_quiet_transformers_bars_unless_verbose(tiny_dir, data_dir, capsys):
    """transformers' own bars ("Loading weights") are off by default in every CLI, on with -v."""
    from transformers.utils import logging as hf_logging

    from lcot.pipeline.evaluate import main as evaluate_main
    from lcot.pipeline.generate import main as generate_main

    image = sorted((data_dir / "images").iterdir())[0]
    for main, argv in ((generate_main, ["--question", "How many?", "--image", str(image)]),
                       (evaluate_main, ["--eval_jsonl", str(data_dir / "test.jsonl")])):
        common = ["--model_name_or_path", str(tiny_dir), "--latent_size" if main is generate_main else
                  "--latent_sizes", "1", "--max_new_tokens", "1"]
        hf_logging.enable_progress_bar()
        main([*common, *argv])
        assert not hf_logging.is_progress_bar_enabled()
        main([*common, *argv, "-v"])
        assert hf_logging.is_progress_bar_enabled()
    capsys.readouterr()
