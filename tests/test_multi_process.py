"""Two training processes (torch.distributed, gloo on CPU): a NaN loss on one rank stops every rank at that step.

The same script runs on two GPUs (NCCL): benchmarks/nan_one_rank.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lcot.pipeline.load import load
from lcot.pipeline.runs import last_checkpoint
from lcot.precompute_teacher_latents import main as precompute_main

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int, logs: Path) -> list[subprocess.Popen]:
    """`world` processes of benchmarks/nan_one_rank.py, with the environment torchrun would give them."""
    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
        with (logs / f"rank{rank}.log").open("w") as f:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "nan_one_rank.py"), *argv],
                                          stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    return procs


def run_ranks(argv: list[str], world: int, logs: Path, timeout: float = 240) -> tuple[list, list[str], float]:
    """Launch, wait for every process (killing any left after `timeout`): exit codes, logs, and the seconds
    between the first and the last exit (processes that stop together, not one waiting for a timeout)."""
    procs, exited = launch(argv, world, logs), {}
    end = time.time() + timeout
    while len(exited) < world and time.time() < end:
        exited.update({r: time.time() for r, p in enumerate(procs) if r not in exited and p.poll() is not None})
        time.sleep(0.05)
    codes = [p.poll() for p in procs]
    for p in procs:
        if p.poll() is None:
            p.kill()
    texts = [(logs / f"rank{r}.log").read_text() for r in range(world)]
    spread = max(exited.values()) - min(exited.values()) if len(exited) == world else float("inf")
    return codes, texts, spread


@pytest.fixture(scope="module")
def teacher(data_dir, tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mp") / "teacher"
    precompute_main([str(a) for a in ["--model_name_or_path", tiny_dir, "--train_jsonl", data_dir / "train.jsonl",
                                      "--output_dir", out, "--k_max", "3", "--bsz", "6", "--benefit_records", "0"]])
    return out


def test_nan_on_one_rank_stops_every_rank_at_that_step_with_exit_3(data_dir, tiny_dir, teacher, tmp_path):
    out = tmp_path / "out"
    argv = [str(a) for a in ["--bad_rank", 1, "--bad_step", 2, "--", "--stage", "stage2", "--model_name_or_path",
                             tiny_dir, "--train_jsonl", data_dir / "train.jsonl", "--output_dir", out,
                             "--latent_size", 3, "--teacher_latent_dir", teacher, "--bsz", 2,
                             "--grad_accum_steps", 1, "--max_steps", 5, "--save_steps", 1, "--logging_steps", 1,
                             "--warmup_steps", 0]]
    codes, logs, spread = run_ranks(argv, 2, tmp_path)
    assert codes == [3, 3], f"exit codes {codes}\n" + "\n".join(log[-2000:] for log in logs)
    assert spread < 10  # they stopped together: no rank waited in a collective for its timeout (30 min)
    for log in logs:
        m = re.search(r"lcot: error: loss is nan at step 2 on rank 1 of 2, batch records \[(\d+), (\d+)\]", log)
        assert m, log[-2000:]
        assert "Traceback" not in log
    assert last_checkpoint(out) == out / "checkpoint-1"
    assert not (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
    model, _ = load(out / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_process_keeps_the_message_without_ranks(data_dir, tiny_dir, teacher, tmp_path):
    """world 1: the same injection names no rank (the single-process message is unchanged)."""
    out = tmp_path / "out"
    argv = [str(a) for a in ["--bad_rank", 0, "--bad_step", 2, "--", "--stage", "stage2", "--model_name_or_path",
                             tiny_dir, "--train_jsonl", data_dir / "train.jsonl", "--output_dir", out,
                             "--latent_size", 3, "--teacher_latent_dir", teacher, "--bsz", 2,
                             "--grad_accum_steps", 1, "--max_steps", 3, "--save_steps", 1, "--warmup_steps", 0]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nan_one_rank.py"), *argv], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 3, res.stderr[-2000:]
    assert re.search(r"lcot: error: loss is nan at step 2, batch records \[\d+, \d+\]", res.stderr), res.stderr[-2000:]


def test_one_process_with_several_gpus_trains_on_one(capsys):
    """Without a launcher, Trainer would wrap the model in nn.DataParallel (n_gpu > 1), whose replicas have no
    parameters of their own (seen on a 2-GPU H100: StopIteration in the vision tower's dtype)."""
    from types import SimpleNamespace

    from lcot.pipeline.train import one_gpu_per_process

    targs = SimpleNamespace(n_gpu=2, _n_gpu=2, device="cuda:0")
    one_gpu_per_process(targs)
    assert targs._n_gpu == 1
    assert "2 GPUs are visible to one process: training on cuda:0 only" in capsys.readouterr().err
    single = SimpleNamespace(n_gpu=1, _n_gpu=1, device="cuda:0")
    one_gpu_per_process(single)
    assert single._n_gpu == 1 and capsys.readouterr().err == ""


def test_a_full_disk_on_one_rank_stops_every_rank_with_exit_4(data_dir, tiny_dir, teacher, tmp_path):
    """Rank 1's part of checkpoint-2 meets a full disk: both processes exit 4 naming the file, instead of rank 0
    waiting at the save's barrier until a launcher or the group's timeout stops it."""
    out = tmp_path / "out"
    argv = [str(a) for a in ["--fault", "disk", "--bad_rank", 1, "--bad_step", 2, "--", "--stage", "stage2",
                             "--model_name_or_path", tiny_dir, "--train_jsonl", data_dir / "train.jsonl",
                             "--output_dir", out, "--latent_size", 3, "--teacher_latent_dir", teacher, "--bsz", 2,
                             "--grad_accum_steps", 1, "--max_steps", 4, "--save_steps", 1, "--warmup_steps", 0]]
    codes, logs, spread = run_ranks(argv, 2, tmp_path)
    assert codes == [4, 4], f"exit codes {codes}\n" + "\n".join(log[-2000:] for log in logs)
    assert spread < 10
    for log in logs:
        named = r"lcot: error: no space left on device while writing \S*checkpoint-2\S*rng_state_1.pth"
        assert re.search(named, log), log[-2000:]
        assert "Traceback" not in log
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no .tmp-checkpoint-2


def test_adjoint_gradient_under_ddp_trains_the_model_full_does(data_dir, tiny_dir, teacher, tmp_path):
    """--latent_grad adjoint runs a second backward inside the first (lcot.fast.adjoint): under DDP it must
    still reduce each gradient once, so 3 steps on 2 processes give the weights --latent_grad full gives."""
    weights = {}
    for grad in ("full", "adjoint"):
        out = tmp_path / grad
        argv = [str(a) for a in ["--bad_step", 99, "--", "--stage", "stage2", "--model_name_or_path", tiny_dir,
                                 "--train_jsonl", data_dir / "train.jsonl", "--output_dir", out, "--latent_size", 3,
                                 "--teacher_latent_dir", teacher, "--bsz", 2, "--grad_accum_steps", 1,
                                 "--max_steps", 3, "--warmup_steps", 0, "--learning_rate", 1e-3, "--latent_grad", grad]]
        (tmp_path / f"logs_{grad}").mkdir()
        codes, logs, _ = run_ranks(argv, 2, tmp_path / f"logs_{grad}")
        assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(log[-2000:] for log in logs)
        weights[grad] = dict(load(out)[0].named_parameters())
    base, _ = load(tiny_dir)
    steps = {grad: {name: (w[name] - p).detach() for name, p in base.named_parameters()} for grad, w in weights.items()}
    moved = max(d.abs().max().item() for d in steps["full"].values())
    assert moved > 1e-3  # they trained: the largest change is the sum of the 3 steps' learning rates, 2e-3
    # The two runs differ in the last bits of their gradients (another order of the same sums), and Adam divides
    # each element's step by the root of its running squared gradient: where a gradient is near zero, the last
    # bits become a visible share of that element's step (measured: 2.2e-5 on 4 elements of 65,536, 1.1% of the
    # largest change). So each element's change may differ by 2.5% of the largest change (5e-5 here), and the
    # changes as a whole by 0.1% of their norm (measured 2.2e-5). A gradient without the chain's term
    # (--latent_grad truncated) is far outside both: up to 4e-3 an element, 32% of the norm.
    for name, full in steps["full"].items():
        torch.testing.assert_close(steps["adjoint"][name], full, atol=0.025 * moved, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    diff = torch.cat([(steps["adjoint"][n] - full).flatten() for n, full in steps["full"].items()])
    norm = torch.cat([full.flatten() for full in steps["full"].values()]).norm()
    assert diff.norm() < 1e-3 * norm, (diff.norm() / norm).item()
