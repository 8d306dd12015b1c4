"""A full disk (ENOSPC injected at the write inside torch.save, safetensors and PIL) through each command's
main([...]): one message, exit code 4, nothing half-written under a final name, and a rerun completes.
Two runs on one output folder: the second is refused while the first lives, and a killed one's lock is stale.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from test_faults import absolute_jsonl, env
from transformers import modeling_utils

from lcot.errors import EXIT_DISK_FULL
from lcot.main import main as train_main
from lcot.pipeline.data import read_records
from lcot.pipeline.runs import lock_file
from lcot.pipeline.teacher import read_teacher, teacher_file
from lcot.precompute_teacher_latents import main as precompute_main
from lcot.toy import synthetic

FAST = ["--bsz", "2", "--grad_accum_steps", "1", "--logging_steps", "1", "--warmup_steps", "0", "--seed", "0"]
NO_SPACE = "No space left on device"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE)


class FillsUp:
    """A file object on a disk with `room` bytes left: the write that crosses it fails with ENOSPC."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            self.f.write(bytes(memoryview(data).cast("B")[: self.room]))
            self.room = 0
            raise enospc()
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def fails(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def data(data_dir, tmp_path_factory) -> Path:
    return absolute_jsonl(data_dir / "train.jsonl", tmp_path_factory.mktemp("disk") / "train.jsonl", 6)


def stage1(tiny, jsonl, out, *extra) -> list:
    return ["--stage", "stage1", "--model_name_or_path", tiny, "--train_jsonl", jsonl, "--output_dir", out,
            "--latent_size", "2", *FAST, *extra]


def precompute_argv(tiny, jsonl, out, *extra) -> list:
    return ["--model_name_or_path", tiny, "--train_jsonl", jsonl, "--output_dir", out, "--k_max", "2",
            "--benefit_records", "0", *extra]


# -- a full disk ---------------------------------------------------------------------------------------------------
def test_full_disk_while_writing_a_teacher_file(tiny_dir, data, tmp_path, monkeypatch, capsys):
    out, real, saved = tmp_path / "teacher", torch.save, []

    def save(obj, f, *a, **k):  # the third file meets a full disk after 300 bytes
        saved.append(obj["idx"])
        return real(obj, FillsUp(f, 300) if len(saved) == 3 else f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    code, err = fails(precompute_main, precompute_argv(tiny_dir, data, out, "--bsz", "1"), capsys)
    monkeypatch.undo()
    assert code == EXIT_DISK_FULL
    named = teacher_file(out, saved[2])
    assert f"lcot: error: no space left on device while writing {named}\n  hint: free space" in err
    assert err.count("lcot: error:") == 1
    records = read_records(data)
    assert sorted(p.name for p in out.iterdir()) == sorted(teacher_file(out, i).name for i in saved[:2])  # no .tmp
    for i in saved[:2]:
        read_teacher(teacher_file(out, i), records[i], 128, 2, torch.float32)
    precompute_main([str(a) for a in precompute_argv(tiny_dir, data, out)])
    assert f"{len(records) - 2} computed, 2 kept" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(teacher_file(out, r.idx).name for r in records)


def test_full_disk_while_writing_a_checkpoint(tiny_dir, data, tmp_path, monkeypatch, capsys):
    """torch.save to a path (Trainer's optimizer.pt) loses the errno in C++: a RuntimeError, and no space left."""
    out, real = tmp_path / "out", torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            Path(f).write_bytes(b"PK\x03\x04 half an optimizer")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    argv = stage1(tiny_dir, data, out, "--max_steps", "6", "--save_steps", "2")
    code, err = fails(train_main, argv, capsys)
    monkeypatch.undo()
    assert code == EXIT_DISK_FULL
    assert f"lcot: error: no space left on device while writing {out / 'checkpoint-4'}" in err
    assert "--resume_from_checkpoint" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "latent_metrics.jsonl"]  # no .tmp-checkpoint-4
    train_main([str(a) for a in [*argv, "--resume_from_checkpoint"]])
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "checkpoint-6").exists()  # the last step writes the final model only (no checkpoint)
    assert hidden(out) == [] and hidden(tmp_path) == []


def test_full_disk_while_writing_the_final_model(tiny_dir, data, tmp_path, monkeypatch, capsys):
    """safetensors (Rust) says it in words: SafetensorError('... No space left on device (os error 28)')."""
    out, real = tmp_path / "out", modeling_utils.safe_save_file

    def save_file(tensors, filename, *a, **k):
        if ".tmp-final" in str(filename):
            Path(filename).write_bytes(b"half a model")
            raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    argv = stage1(tiny_dir, data, out, "--max_steps", "3", "--save_steps", "2")
    code, err = fails(train_main, argv, capsys)
    monkeypatch.undo()
    assert code == EXIT_DISK_FULL
    assert f"lcot: error: no space left on device while writing {out}\n" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "latent_metrics.jsonl"]  # no .tmp-final
    train_main([str(a) for a in [*argv, "--resume_from_checkpoint"]])
    assert (out / "model.safetensors").is_file() and (out / "lcot.json").is_file() and hidden(out) == []


@pytest.mark.parametrize("task", ["count", "hops"])
def test_full_disk_while_writing_a_dataset(task, tmp_path, monkeypatch, capsys):
    out, real, calls = tmp_path / "data", Image.Image.save, []

    def save(self, fp, *a, **k):  # the fifth image meets a full disk after 100 bytes
        calls.append(fp)
        if len(calls) != 5:
            return real(self, fp, *a, **k)
        with open(fp, "wb") as f:
            return real(self, FillsUp(f, 100), *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    argv = ["--output_dir", out, "--task", task, "--n", "6"]
    code, err = fails(synthetic.main, argv, capsys)
    monkeypatch.undo()
    assert code == EXIT_DISK_FULL
    assert f"lcot: error: no space left on device while writing {out.absolute()}\n" in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    synthetic.main([str(a) for a in argv])
    assert (out / "dataset.json").is_file() and len((out / "train.jsonl").read_text().splitlines()) == 5


# -- two runs, one folder -------------------------------------------------------------------------------------------
HOLD = ("import sys, time\nfrom lcot.pipeline.runs import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def holder():
    """Start a process that holds a folder's lock; every one started is SIGKILLed at the end."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                                env=env())
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_ones_lock_is_stale(tiny_dir, data, tmp_path,
                                                                                     holder, capsys):
    out, teacher = tmp_path / "out", tmp_path / "teacher"
    host = socket.gethostname()
    first = holder(out)
    code, err = fails(train_main, stage1(tiny_dir, data, out, "--max_steps", "1"), capsys)
    assert code == 2
    m = re.search(rf"lcot: error: {re.escape(str(out))}: another run is writing this folder \(pid (\d+) on "
                  rf"{re.escape(host)}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC\)\n  hint: wait for it", err)
    assert m and int(m.group(1)) == first.pid, err
    assert not out.exists()
    busy = tmp_path / "busy"  # a live run's folder has files: it is called busy, not "not empty"
    busy.mkdir()
    (busy / "checkpoint-1").mkdir()
    third = holder(busy)
    code, err = fails(train_main, stage1(tiny_dir, data, busy, "--max_steps", "1"), capsys)
    assert code == 2 and f"lcot: error: {busy}: another run is writing this folder (pid {third.pid} on" in err
    third.kill()
    third.wait()
    shutil.rmtree(busy)
    lock_file(busy).unlink()
    pre = holder(teacher)
    code, err = fails(precompute_main, precompute_argv(tiny_dir, data, teacher), capsys)
    assert code == 2 and f"{teacher}: another run is writing this folder (pid {pre.pid} on {host}" in err
    assert not teacher.exists()

    for proc in (first, pre):  # killed: the kernel drops the lock, the file stays behind (stale)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    assert lock_file(out).is_file() and lock_file(teacher).is_file()
    train_main([str(a) for a in stage1(tiny_dir, data, out, "--max_steps", "2", "--save_steps", "1")])
    precompute_main([str(a) for a in precompute_argv(tiny_dir, data, teacher)])
    assert (out / "model.safetensors").is_file() and len(list(teacher.iterdir())) == 6
    assert not lock_file(out).exists() and not lock_file(teacher).exists()  # removed when each run ended
    assert hidden(out) == [] and hidden(tmp_path) == []
    # the same user's next runs on the folder: overwrite, then resume
    train_main([str(a) for a in stage1(tiny_dir, data, out, "--max_steps", "1", "--overwrite_output_dir")])
    train_main([str(a) for a in stage1(tiny_dir, data, out, "--max_steps", "2", "--resume_from_checkpoint")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "teacher"]


RANKS = """import sys
from accelerate import PartialState
from lcot.errors import LcotInputError
from lcot.pipeline.runs import lock_file, run_lock

state = PartialState(cpu=True)  # the ranks of one run, on a CPU (gloo)
try:
    with run_lock(sys.argv[1]):
        print(f"rank {state.process_index}/{state.num_processes} in, locked {lock_file(sys.argv[1]).exists()}",
              flush=True)
        state.wait_for_everyone()
except LcotInputError as err:
    print(f"rank {state.process_index}/{state.num_processes} refused: {err.problem}", flush=True)
    sys.exit(2)
finally:
    state.destroy_process_group()  # gloo left alive at exit aborts now and then ("terminate called ...")
"""


def test_the_ranks_of_one_run_share_the_lock_and_stop_together(tmp_path, holder):
    """Two real processes of one run (torchrun, gloo): only the main one locks, both learn the outcome."""
    script, out = tmp_path / "ranks.py", tmp_path / "out"
    script.write_text(RANKS)

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(out)], capture_output=True, text=True,
                              env=env(), timeout=120)

    run = launch()
    assert run.returncode == 0, run.stderr[-3000:]
    # (the two processes share one stdout pipe: their lines may interleave)
    assert sorted(re.findall(r"rank (\d)/2 in, locked True", run.stdout)) == ["0", "1"], run.stdout
    assert not lock_file(out).exists()
    other = holder(out)
    run = launch()
    assert run.returncode != 0
    refused = rf"rank (\d)/2 refused: another run is writing this folder \(pid {other.pid} on {socket.gethostname()}, "
    assert sorted(re.findall(refused, run.stdout)) == ["0", "1"], run.stdout


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_bad_input_leaves_no_folder_made_for_the_lock(command, tiny_dir, tmp_path, capsys):
    """The lock sits beside the output folder, so its parents are made before the input is read: a refused run
    removes the ones it made (the README: on bad input nothing is written)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("")  # empty: refused after the lock is taken
    out = tmp_path / "new" / "deep" / "out"
    if command == "train":
        code, err = fails(train_main, stage1(tiny_dir, bad, out), capsys)
    else:
        code, err = fails(precompute_main, precompute_argv(tiny_dir, bad, out), capsys)
    assert code == 2 and "lcot: error:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_an_output_folder_under_a_file_is_an_input_error(tiny_dir, data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = fails(train_main, stage1(tiny_dir, data, tmp_path / "afile" / "out"), capsys)
    assert code == 2 and f"cannot be created: {tmp_path / 'afile'} is a file, not a folder" in err
