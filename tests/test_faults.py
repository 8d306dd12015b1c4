"""Faults: kills at any moment (SIGKILL of real subprocesses), NaN/inf losses, and run-to-run determinism.

Kill points are random; the seed is printed in every assertion message and can be fixed with
LCOT_FAULT_SEED=<int> to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcot.main import main as train_main
from lcot.pipeline import trainer as trainer_mod
from lcot.pipeline.data import read_records
from lcot.pipeline.load import load
from lcot.pipeline.runs import METRICS_FILE, last_checkpoint, read_metrics
from lcot.pipeline.teacher import read_teacher, teacher_file
from lcot.precompute_teacher_latents import main as precompute_main

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LCOT_FAULT_SEED", random.randrange(1 << 30)))
CKPT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "lcot.json"}
FAST = ["--bsz", "2", "--grad_accum_steps", "1", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "3e-3"]


def env() -> dict[str, str]:
    # the same intra-op thread count as the test process (conftest), so float sums are ordered alike
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def spawn(module: str, argv: list, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], stdout=f, stderr=subprocess.STDOUT,
                                env=env(), cwd=REPO)


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as ready() holds (polled every 5 ms); it must not have finished by then."""
    end = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point (seed {SEED}):\n{log.read_text()[-3000:]}"
        assert time.time() < end, f"kill point never reached (seed {SEED})"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def absolute_jsonl(src: Path, dst: Path, n: int | None = None) -> Path:
    """A copy of a JSONL with absolute image paths (so it can live anywhere)."""
    lines = []
    for line in src.read_text().splitlines()[:n]:
        r = json.loads(line)
        for key in ("question_image_paths", "thought_image_paths"):
            r[key] = [str(src.parent / p) for p in r[key]]
        lines.append(json.dumps(r))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r.get("align", 0.0)) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def small(data_dir, tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """12 records and their teacher latents (k_max 3) from the tiny model."""
    d = tmp_path_factory.mktemp("faults")
    jsonl = absolute_jsonl(data_dir / "train.jsonl", d / "train.jsonl", 12)
    precompute_main([str(a) for a in ["--model_name_or_path", tiny_dir, "--train_jsonl", jsonl, "--output_dir",
                                      d / "teacher", "--k_max", "3", "--bsz", "6"]])
    return {"jsonl": jsonl, "teacher": d / "teacher"}


def stage_argv(stage: str, tiny, small, out, *extra) -> list[str]:
    teacher = [] if stage == "stage1" else ["--teacher_latent_dir", small["teacher"]]
    return [str(a) for a in ["--stage", stage, "--model_name_or_path", tiny, "--train_jsonl", small["jsonl"],
                             "--output_dir", out, "--latent_size", "3", *teacher, *FAST, *extra]]


# -- determinism -------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_losses_on_cpu(tiny_dir, small, tmp_path):
    runs = {}
    for name, seed, steps in (("a", 0, 3), ("b", 0, 3), ("c", 1, 2)):
        train_main(stage_argv("stage2", tiny_dir, small, tmp_path / name, "--max_steps", steps, "--seed", seed))
        runs[name] = losses(tmp_path / name)
    assert [s for s, _, _ in runs["a"]] == [1, 2, 3]
    assert runs["a"] == runs["b"]  # bit for bit: CE and alignment, every step
    assert all(0 < loss < 50 and 0 < align for _, loss, align in runs["a"])
    assert runs["c"][:2] != runs["a"][:2]  # the seed matters (data order): the test can fail
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- checkpoints are written whole or not at all ------------------------------------------------------------
def test_a_save_that_dies_midway_leaves_no_checkpoint_and_resume_reproduces(tiny_dir, small, tmp_path, monkeypatch):
    argv = ["--max_steps", "6", "--save_steps", "2", "--seed", "0", "--save_total_limit", "2"]
    train_main(stage_argv("stage1", tiny_dir, small, tmp_path / "ref", *argv))
    ref = losses(tmp_path / "ref")
    # no checkpoint-6: the final model is written at the last step instead
    assert sorted(p.name for p in (tmp_path / "ref").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    real = trainer_mod.Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:  # model and optimizer are written; the process "dies" here
            raise SystemError("killed mid-save")
        return real(self, output_dir)

    monkeypatch.setattr(trainer_mod.Trainer, "_save_rng_state", dies_at_step_4)
    out = tmp_path / "cut"
    with pytest.raises(SystemError, match="killed mid-save"):
        train_main(stage_argv("stage1", tiny_dir, small, out, *argv))
    monkeypatch.undo()
    staged = out / ".tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and not (staged / "rng_state.pth").exists()  # really partial
    assert not (out / "checkpoint-4").exists()
    assert last_checkpoint(out) == out / "checkpoint-2"
    assert set(os.listdir(out / "checkpoint-2")) >= CKPT_FILES
    with (out / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "lo')  # and the metrics line being written was cut short
    train_main(stage_argv("stage1", tiny_dir, small, out, *argv, "--resume_from_checkpoint"))
    assert losses(out) == ref
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- SIGKILL mid-training, then resume --------------------------------------------------------------------------
def test_sigkill_during_training_then_resume_reproduces_the_loss_curve(tiny_dir, small, tmp_path):
    """stage3: teacher alignment and K sampled per step; 6 steps, a checkpoint every 2 (the kill may hit a save)."""
    argv = ["--max_steps", "6", "--save_steps", "2", "--seed", "0", "--save_total_limit", "2"]
    train_main(stage_argv("stage3", tiny_dir, small, tmp_path / "ref", *argv))
    ref = losses(tmp_path / "ref")
    assert len(ref) == 6 and len({r[2] for r in ref}) > 1
    kill_step = random.Random(SEED).randint(1, 5)
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = spawn("lcot.main", stage_argv("stage3", tiny_dir, small, out, *argv), log)
    metrics = out / METRICS_FILE
    kill_when(proc, lambda: metrics.is_file() and metrics.read_text().count("\n") >= kill_step, log)
    msg = f"killed after logging step {kill_step} (seed {SEED})"
    for ckpt in out.glob("checkpoint-*"):
        assert set(os.listdir(ckpt)) >= CKPT_FILES, msg  # only complete checkpoints carry the name
    assert not (out / "model.safetensors").exists(), msg
    done = last_checkpoint(out)
    train_main(stage_argv("stage3", tiny_dir, small, out, *argv, "--resume_from_checkpoint"))
    assert losses(out) == ref, f"{msg}; resumed from {done}"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], msg  # no staging leftovers
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), msg


# -- SIGKILL mid-precompute, then run again --------------------------------------------------------------------
def test_sigkill_during_precompute_then_rerun_finishes_and_keeps_complete_files(data_dir, tiny_dir, tmp_path,
                                                                                  capsys):
    jsonl = absolute_jsonl(data_dir / "train.jsonl", tmp_path / "train.jsonl", 14)
    records = read_records(jsonl)
    n = len(records)
    argv = ["--model_name_or_path", tiny_dir, "--train_jsonl", jsonl, "--k_max", "3", "--bsz", "1"]
    out, log = tmp_path / "teacher", tmp_path / "pre.log"
    stop_at = random.Random(SEED).randint(1, n // 2)
    msg = f"killed after {stop_at} of {n} files (seed {SEED})"
    proc = spawn("lcot.precompute_teacher_latents", [*argv, "--output_dir", out], log)
    kill_when(proc, lambda: out.is_dir() and len(list(out.glob("latent_*.pt"))) >= stop_at, log)

    complete = sorted(out.glob("latent_*.pt"))
    assert stop_at <= len(complete) < n, msg
    for path in complete:  # every file that carries the name is whole and valid
        read_teacher(path, records[int(path.stem.rsplit("_", 1)[1])], 128, 3, torch.float32)
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in complete}
    # what a kill inside torch.save leaves: a temporary file (made here, in case the kill fell between files)
    missing = next(r.idx for r in records if not teacher_file(out, r.idx).exists())
    (out / f".{teacher_file(out, missing).name}.x1y2z3.tmp").write_bytes(b"PK\x03\x04 half a zip")

    capsys.readouterr()
    precompute_main([str(a) for a in [*argv, "--output_dir", out]])
    printed = capsys.readouterr().out  # information: stdout
    assert f"{n - len(complete)} computed, {len(complete)} kept" in printed, msg
    assert sorted(p.name for p in out.iterdir()) == sorted(teacher_file(out, r.idx).name for r in records), msg
    assert {p: (out / p).stat().st_ino for p in stamps} == {p: s[0] for p, s in stamps.items()}, msg
    assert {p: (out / p).stat().st_mtime_ns for p in stamps} == {p: s[1] for p, s in stamps.items()}, msg

    # the same latents as one uninterrupted run (batched: equal to single records within float error)
    precompute_main([str(a) for a in [*argv, "--output_dir", tmp_path / "ref", "--bsz", "7"]])
    for r in records:
        got = read_teacher(teacher_file(out, r.idx), r, 128, 3, torch.float32)
        want = read_teacher(teacher_file(tmp_path / "ref", r.idx), r, 128, 3, torch.float32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=msg)


# -- NaN / inf --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, what", [("1e2", "gradient norm"), ("1e8", "loss")])
def test_non_finite_loss_stops_naming_step_and_records_keeping_the_last_good_checkpoint(
        lr, what, tiny_dir, small, tmp_path, capsys, monkeypatch):
    """A huge learning rate: with 1e2 the weights stay finite but the step-2 gradient is NaN (stopped before
    the optimizer would write NaN into the weights); with 1e8 the step-2 loss itself is NaN."""
    argv = ["--max_steps", "6", "--save_steps", "1", "--seed", "0", "--learning_rate", lr]
    seen: list[list[int]] = []  # record idx of each batch, in training order
    real = trainer_mod.LatentTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        seen.append(list(inputs["idx"]))
        return real(self, model, inputs, *a, **k)

    monkeypatch.setattr(trainer_mod.LatentTrainer, "compute_loss", spy)
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_main(stage_argv("stage2", tiny_dir, small, out, *argv))
    err = capsys.readouterr().err
    assert exc.value.code == 3 and "Traceback" not in err
    m = re.search(rf"lcot: error: {what} is (nan|inf|-inf) at step (\d+), batch records \[(\d+), (\d+)\]", err)
    assert m, err
    step, named = int(m.group(2)), [int(m.group(3)), int(m.group(4))]
    assert step == 2
    assert named == seen[step - 1]  # the records of the batch that failed
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", METRICS_FILE]  # no final model
    model, _ = load(out / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


# -- soak: five SIGKILLs across the teacher precompute and stage3, resumed each time ----------------------------
SOAK_SEED = int(os.environ.get("LCOT_SOAK_SEED", "0"))  # fixed kill points: the test replays alike every run


def _log_history(ckpt: Path) -> list[dict]:
    return [e for e in json.loads((ckpt / "trainer_state.json").read_text())["log_history"] if "loss" in e]


@pytest.mark.slow  # about 30 s on 2 CPU cores
def test_soak_five_sigkills_across_precompute_and_stage3_end_identical_to_an_uninterrupted_run(tiny_dir, small,
                                                                                                tmp_path, capsys):
    """Precompute (killed twice: after a few teacher files), then stage3 (killed mid-save of a checkpoint, then
    twice after a logged step). After each kill the precompute is run again, then training with
    --resume_from_checkpoint. Teacher files, per-step losses, the log history and the weights must equal one
    uninterrupted run's, bit for bit."""
    rng = random.Random(SOAK_SEED)
    n = len(read_records(small["jsonl"]))
    pre = ["--model_name_or_path", tiny_dir, "--train_jsonl", small["jsonl"], "--k_max", "3", "--bsz", "1"]
    argv = ["--max_steps", "8", "--save_steps", "2", "--seed", "0", "--save_total_limit", "2",
            "--save_final_checkpoint"]  # checkpoint-8's log history is compared
    precompute_main([str(a) for a in [*pre, "--output_dir", tmp_path / "ref_teacher"]])
    train_main(stage_argv("stage3", tiny_dir, {**small, "teacher": tmp_path / "ref_teacher"}, tmp_path / "ref", *argv))
    ref = losses(tmp_path / "ref")
    assert [s for s, _, _ in ref] == list(range(1, 9))

    teacher, out = tmp_path / "teacher", tmp_path / "run"
    run = {**small, "teacher": teacher}
    first = rng.randint(1, n // 3)
    second = rng.randint(first + 2, n - 3)
    save_at = 2 * rng.randint(1, 2)
    step_a = rng.randint(save_at + 1, 6)
    step_b = rng.randint(step_a + 1, 7)
    msg = (f"kills: precompute after {first} and {second} of {n} files, stage3 mid-save of checkpoint-{save_at}, "
           f"after step {step_a}, after step {step_b} (LCOT_SOAK_SEED={SOAK_SEED})")

    def files() -> int:
        return len(list(teacher.glob("latent_*.pt"))) if teacher.is_dir() else 0

    def logged() -> int:
        return max((r["step"] for r in read_metrics(out)), default=0)

    def rerun_precompute() -> str:
        capsys.readouterr()
        precompute_main([str(a) for a in [*pre, "--output_dir", teacher]])
        return capsys.readouterr().out

    for at in (first, second):  # 1, 2: mid-precompute
        log = tmp_path / f"pre{at}.log"
        kill_when(spawn("lcot.precompute_teacher_latents", [*pre, "--output_dir", teacher], log),
                  lambda at=at: files() >= at, log)
        assert at <= files() < n, msg
    assert f"{n - files()} computed, {files()} kept" in rerun_precompute(), msg

    def train_until(ready, name: str) -> None:
        log = tmp_path / f"{name}.log"
        kill_when(spawn("lcot.main", stage_argv("stage3", tiny_dir, run, out, *argv, "--resume_from_checkpoint"), log),
                  ready, log)
        for ckpt in out.glob("checkpoint-*"):  # only complete checkpoints carry the name
            assert set(os.listdir(ckpt)) >= CKPT_FILES, f"{msg}; after the kill {name}"
        assert not (out / "model.safetensors").exists(), msg
        assert f"0 computed, {n} kept" in rerun_precompute(), msg

    staging = out / f".tmp-checkpoint-{save_at}"
    train_until(staging.is_dir, "mid-save")  # 3: the staging folder exists, so the save is under way
    assert staging.is_dir() and not (out / f"checkpoint-{save_at}").exists(), msg
    train_until(lambda: logged() >= step_a, "step_a")  # 4
    train_until(lambda: logged() >= step_b, "step_b")  # 5
    done = last_checkpoint(out)
    train_main(stage_argv("stage3", tiny_dir, run, out, *argv, "--resume_from_checkpoint"))

    assert losses(out) == ref, f"{msg}; last resumed from {done}"
    assert _log_history(out / "checkpoint-8") == _log_history(tmp_path / "ref" / "checkpoint-8"), msg
    assert not [p for p in out.iterdir() if p.name.startswith(".")], msg  # no staging leftovers
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), msg
    assert sorted(p.name for p in teacher.iterdir()) == sorted(p.name for p in (tmp_path / "ref_teacher").iterdir())
    for p in teacher.iterdir():
        assert torch.equal(torch.load(p)["latents"], torch.load(tmp_path / "ref_teacher" / p.name)["latents"]), msg
