"""A NaN loss (or a full disk) on one rank only, in a multi-process stage2 run: every process must stop.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/nan_one_rank.py --bad_rank 1 --bad_step 2 \\
        -- <lcot.main flags: a stage2 run with --teacher_latent_dir and --save_steps 1>

The teacher latents of the bad rank's batch at optimizer step `bad_step` are replaced by NaN (what a corrupted
teacher file would do), so only that rank's loss is NaN. Expected: each process exits with code 3 within
seconds, printing `loss is nan at step <bad_step> on rank <bad_rank> of <world>, batch records [...]`, and the
last checkpoint (step bad_step - 1) loads. tests/test_faults.py runs it on CPU (gloo); on GPUs (NCCL) with
accelerate: `python -m accelerate.commands.launch --num_processes 2 benchmarks/nan_one_rank.py ...`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

import torch

from lcot.main import main
from lcot.pipeline import trainer as trainer_mod


def full_disk(bad_rank: int, bad_step: int) -> None:
    """The bad rank's part of checkpoint-<bad_step> (its RNG state, or the optimizer on rank 0) meets a full disk."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        if rank == bad_rank and f"checkpoint-{bad_step}" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


def inject(bad_rank: int, bad_step: int) -> None:
    real = trainer_mod.LatentTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.accelerator.process_index == bad_rank and self.state.global_step + 1 == bad_step:
            inputs = {**inputs, "teacher": torch.full_like(inputs["teacher"], float("nan"))}
        return real(self, model, inputs, *args, **kwargs)

    trainer_mod.LatentTrainer.compute_loss = compute_loss


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bad_rank", type=int, default=1, help="the process whose loss becomes NaN (default: 1)")
    p.add_argument("--bad_step", type=int, default=2, help="the optimizer step (1-based) that fails (default: 2)")
    p.add_argument("--fault", choices=("nan", "disk"), default="nan",
                   help="nan: a NaN loss; disk: a full disk while the bad rank writes checkpoint-<bad_step> "
                        "(every process must exit with code 4) (default: nan)")
    args, rest = p.parse_known_args()
    (inject if args.fault == "nan" else full_disk)(args.bad_rank, args.bad_step)
    print(f"nan_one_rank: rank {os.environ.get('RANK')} pid {os.getpid()}", file=sys.stderr, flush=True)
    main([a for a in rest if a != "--"])
