"""Shared fixtures: the tiny offline model and a small bundled dataset, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton's CPU interpreter for lcot.core.skinny's kernel (read at triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # 2 threads on 2 busy cores made runs 10x slower (spin-waits)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped where torch sees no CUDA device (the markers: pyproject.toml)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch. transformers wraps every model's forward in one function, whose compiled
    versions dynamo counts together: past its recompile limit (8 by default) a compiled call runs eagerly, with
    only a log line to say so, and a test of the compiled path would test the eager one (seen on a GPU, where
    more tests compile)."""
    torch._dynamo.reset()


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


@pytest.fixture
def tiny_on(tiny_dir, records):
    """make(k, device="cuda") -> (a fresh tiny model on `device`, eval mode; a stage2 batch of 2 records with K=k
    latents there, image_grid_thw left on the CPU): the GPU tests' setup."""
    def make(k: int, device: str = "cuda"):
        from lcot.core.collate import Collator
        from lcot.pipeline.load import load

        model, processor = load(tiny_dir)
        model = model.to(device).eval()
        b = Collator(processor, model.config, k, thought_images=True)(records[:2])
        return model, {key: v.to(device) if torch.is_tensor(v) and key != "image_grid_thw" else v
                       for key, v in b.items()}

    return make


def lora_tiny(tiny_dir, records, dtype: torch.dtype, targets: str = "q_proj|v_proj|gate_proj|down_proj",
              device: str = "cpu"):
    """(the tiny model in `dtype` with peft LoRA adapters (r=4, fp32 as peft keeps them, no dropout) on the
    language model's `targets`, a stage2 batch of 2 records with K=3 on `device`). B is drawn non-zero: peft
    starts it at zero, and the adapters would add nothing."""
    import peft

    from lcot.core.collate import Collator
    from lcot.pipeline.load import load

    model, processor = load(tiny_dir, dtype=dtype)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=rf".*language_model.*\.({targets})")
    model = peft.get_peft_model(model, cfg).get_base_model().to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    batch = Collator(processor, model.config, 3, thought_images=True)(records[:2])
    return model, {k: v.to(device) if torch.is_tensor(v) and k != "image_grid_thw" else v for k, v in batch.items()}
