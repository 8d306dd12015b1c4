"""The Qwen2.5-VL processor without a video processor, read from local folders only.

transformers 5 makes `Qwen2_5_VLProcessor` require a video processor, and that needs torchvision,
which does not import beside the CPU build of torch. Images are all this kit uses, so
`LatentVLProcessor` drops the video processor. Its image processor is always
`Qwen2VLImageProcessorPil`: the PIL backend gives the same pixel values on CPU and GPU machines,
whereas `AutoImageProcessor` would pick the torchvision backend wherever torchvision is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

# Qwen2.5-VL's own defaults, used when a folder's image processor config names neither bound.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


class LatentVLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images and text only (no video processor, so no torchvision).

    `ProcessorMixin` derives the sub-processors from the `__init__` signature, so leaving
    `video_processor` out of it is what makes saving and loading skip the video processor.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil | None = None, tokenizer: Any = None,
                 chat_template: str | dict[str, str] | None = None) -> None:
        if image_processor is None or tokenizer is None:
            raise ValueError("LatentVLProcessor needs both an image_processor and a tokenizer")
        # As Qwen2_5_VLProcessor.__init__, minus the video processor it insists on.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if not isinstance(self.image_token_id, int):
            raise ValueError(f"the tokenizer has no {self.image_token} token: not a Qwen2.5-VL tokenizer")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        # Without this, videos would be dropped silently (there is no video processor to run).
        if videos is not None:
            raise ValueError("LatentVLProcessor handles images and text only; videos are not supported")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save as transformers does, plus `preprocessor_config.json` as in stock Qwen checkpoints."""
        if push_to_hub:
            raise ValueError("LatentVLProcessor saves to local folders only")
        files = super().save_pretrained(str(save_directory), **kwargs)
        files += [str(p) for p in self.image_processor.save_pretrained(str(save_directory))]
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, min_pixels: int | None = None,
                        max_pixels: int | None = None, **_ignored: Any) -> LatentVLProcessor:
        """Load from a local folder (see `load_processor`). Hub arguments are accepted and ignored."""
        return load_processor(pretrained_model_name_or_path, min_pixels=min_pixels, max_pixels=max_pixels)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: not a directory. Pass a local Qwen2.5-VL checkpoint folder (with preprocessor_config.json "
            "and tokenizer files), e.g. one written by `python -m lcot.toy.tiny --output_dir DIR`; nothing is "
            "downloaded from a hub.")
    missing = []
    if not ((path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()):
        missing.append("preprocessor_config.json (or processor_config.json)")
    if not ((path / "tokenizer.json").is_file() or
            ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        missing.append("tokenizer.json (or vocab.json and merges.txt)")
    if missing:
        raise FileNotFoundError(f"{path}: not a Qwen2.5-VL processor folder; missing {' and '.join(missing)}")


def _image_processor(path: Path, min_pixels: int | None, max_pixels: int | None) -> Qwen2VLImageProcessorPil:
    cfg, _ = Qwen2VLImageProcessorPil.get_image_processor_dict(str(path), local_files_only=True)
    cfg = dict(cfg)
    # Stock configs give the bounds as min_pixels/max_pixels, newer saves as size; the former win, as in
    # transformers. Always pass a fresh `size`: Qwen2VLImageProcessorPil(min_pixels=...) without one
    # writes the bounds into the class-level default dict, changing every later instance.
    size = dict(cfg.pop("size", None) or {})
    file_min, file_max = cfg.pop("min_pixels", None), cfg.pop("max_pixels", None)

    def pick(*values: int | None) -> int:
        return int(next(v for v in values if v is not None))

    lo = pick(min_pixels, file_min, size.get("shortest_edge"), DEFAULT_MIN_PIXELS)
    hi = pick(max_pixels, file_max, size.get("longest_edge"), DEFAULT_MAX_PIXELS)
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={lo}, max_pixels={hi}")
    cfg["size"] = {"shortest_edge": lo, "longest_edge": hi}
    return Qwen2VLImageProcessorPil.from_dict(cfg)


def _chat_template(path: Path) -> str | dict[str, str] | None:
    """chat_template.jinja (plus additional_chat_templates/) or the legacy chat_template.json."""
    processor_dict, _ = ProcessorMixin.get_processor_dict(str(path), local_files_only=True)
    return processor_dict.get("chat_template")


def load_processor(path: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> LatentVLProcessor:
    """Processor from a local folder laid out like a stock Qwen2.5-VL checkpoint; never reaches a hub.

    `min_pixels` / `max_pixels` override the folder's resize bounds (total pixels per image after
    resizing; sides become multiples of patch_size * merge_size = 28).

    The chat template comes from the folder's chat_template files (as transformers' processors read
    it), else from tokenizer_config.json. It is set on the tokenizer too, so that
    `tokenizer.apply_chat_template` and `processor.apply_chat_template` render the same text.
    """
    path = Path(path)
    _check_folder(path)
    image_processor = _image_processor(path, min_pixels, max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    template = _chat_template(path) or tokenizer.chat_template
    if template is not None:
        tokenizer.chat_template = template
    return LatentVLProcessor(image_processor, tokenizer, chat_template=template)
