"""Shared fixtures: the tiny offline model and a small bundled dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # 2 threads on 2 busy cores made runs 10x slower (spin-waits)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from lcot.toy.tiny import build_tiny

    return Path(build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    from lcot.toy.synthetic import generate

    paths = generate(tmp_path_factory.mktemp("data") / "shapes", n=30, seed=0)
    return Path(paths["train"]).parent


@pytest.fixture(scope="session")
def records(data_dir):
    from lcot.pipeline.data import read_records

    return read_records(data_dir / "train.jsonl")


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    """(model, processor) in fp32, eval mode; tests must not change the weights."""
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir)
    return model.eval(), processor
