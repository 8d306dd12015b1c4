"""Checks of tensor invariants that do not stall a GPU.

Reading a condition back to the host (`if bool(t): raise`) waits for every kernel queued before it; in a
small model's training step, that wait is paid several times a step. On CUDA these checks are device-side
asserts instead (a failure stops the process at the next sync, with the CUDA error); on a CPU they raise a
ValueError with the message at once.
"""

from __future__ import annotations

import torch


def check(cond: torch.Tensor, message: str) -> None:
    """Assert a boolean scalar tensor: asynchronously on CUDA, at once (ValueError(message)) elsewhere."""
    if cond.device.type == "cuda":
        torch._assert_async(cond)
    elif not bool(cond):
        raise ValueError(message)
