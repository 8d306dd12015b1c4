"""Load a Qwen2.5-VL checkpoint (a local folder: a real one or the tiny one) ready for latent mode."""

from __future__ import annotations

from pathlib import Path

import torch

from lcot.config import SpeedConfig
from lcot.core.model import LatentQwen2_5_VL
from lcot.core.tokens import TokenIds, add_latent_tokens
from lcot.errors import LcotInputError
from lcot.pipeline.processor import LatentVLProcessor, load_processor


def check_model_folder(path: str | Path) -> Path:
    """The path of a local model folder; anything else (nothing there, a file, no config.json) is an input error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LcotInputError(str(path), "not a model folder (no config.json)",
                             "pass a local Qwen2.5-VL checkpoint folder, e.g. one written by `python -m lcot.toy.tiny`")
    return path


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa", min_pixels: int | None = None, max_pixels: int | None = None,
         speed: SpeedConfig | None = None, **runner_options) -> tuple[LatentQwen2_5_VL, LatentVLProcessor]:
    """Model and processor from a local folder; the latent tokens are added when absent.

    Nothing is fetched from a hub: a path that is not a local checkpoint folder is an input error. The model is
    given its runner (`attach_runner`) by `speed` (default: SpeedConfig(), lcot.fast's runner).
    """
    path = check_model_folder(path)
    try:
        processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    except (FileNotFoundError, ValueError) as err:  # a folder without tokenizer files, bad pixel bounds
        raise LcotInputError(str(path), str(err).removeprefix(f"{path}: ")) from None
    model = LatentQwen2_5_VL.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                             local_files_only=True)
    add_latent_tokens(processor.tokenizer, model)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = TokenIds.from_tokenizer(processor.tokenizer)  # by string: any ids work if the model has their rows
    latent_ids = (ids.latent_start, ids.latent_end, ids.latent_pad)
    if max(latent_ids) >= rows:
        raise LcotInputError(str(path), f"the tokenizer's latent token ids {latent_ids} do not fit the model's "
                             f"{rows} embedding rows",
                             "save the model after resizing its embeddings (model.resize_token_embeddings)")
    model = model.to(device)
    attach_runner(model, speed, **runner_options)
    return model, processor


def attach_runner(model, speed: SpeedConfig | None = None, **options):
    """Give `model` the runner `speed` asks for: lcot.fast.Runner (options: its compile, graph_pass, ...) unless
    speed.fast is "off", where the model keeps the reference passes and lcot.fast is not even imported."""
    speed = speed or SpeedConfig()
    if speed.fast == "off":
        model.lcot_runner = None
        return None
    from lcot.fast import Runner

    return Runner(model, fast=speed.fast, compile_step=speed.compile_step, **options).attach()


def compile_note(speed: SpeedConfig, device: torch.device | str) -> str | None:
    """What a command prints before a run whose one-token step will be compiled (None: it will not be)."""
    if speed.fast == "off":
        return None
    from lcot.fast.runner import COMPILE_NOTE, compiles_step

    return COMPILE_NOTE if compiles_step(speed.fast, speed.compile_step, device) else None
