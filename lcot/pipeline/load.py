"""Load a Qwen2.5-VL checkpoint (a local folder: a real one or the tiny one) ready for latent mode."""

from __future__ import annotations

from pathlib import Path

import torch

from lcot.core.attention import use_step_attention
from lcot.core.model import LatentQwen2_5_VL
from lcot.core.tokens import TokenIds, add_latent_tokens
from lcot.core.vision import use_packed_attention
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
         ) -> tuple[LatentQwen2_5_VL, LatentVLProcessor]:
    """Model and processor from a local folder; the latent tokens are added when absent.

    Nothing is fetched from a hub: a path that is not a local checkpoint folder is an input error.
    """
    path = check_model_folder(path)
    try:
        processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    except (FileNotFoundError, ValueError) as err:  # a folder without tokenizer files, bad pixel bounds
        raise LcotInputError(str(path), str(err).removeprefix(f"{path}: ")) from None
    model = LatentQwen2_5_VL.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                             local_files_only=True)
    use_packed_attention(model)  # the vision tower's attention without a per-image loop (lcot.core.vision)
    use_step_attention(model)  # single-token steps without repeat_kv's copies (lcot.core.attention)
    add_latent_tokens(processor.tokenizer, model)
    rows = model.get_input_embeddings().weight.shape[0]
    ids = TokenIds.from_tokenizer(processor.tokenizer)  # by string: any ids work if the model has their rows
    latent_ids = (ids.latent_start, ids.latent_end, ids.latent_pad)
    if max(latent_ids) >= rows:
        raise LcotInputError(str(path), f"the tokenizer's latent token ids {latent_ids} do not fit the model's "
                             f"{rows} embedding rows",
                             "save the model after resizing its embeddings (model.resize_token_embeddings)")
    return model.to(device), processor
