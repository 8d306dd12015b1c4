"""The tiny offline checkpoint (lcot.toy.tiny) and the processor loader (lcot.pipeline.processor)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from lcot.pipeline.processor import LatentVLProcessor, load_processor
from lcot.toy.tiny import BUILT_FILE, CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny

REPO = Path(__file__).resolve().parents[1]
QUESTION = "How many red circles are in the image?"
USER_WITH_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _image(size=(112, 112), color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(color, (10, 10, size[0] // 2, size[1] // 2))
    return img


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny)  # weights, tokenizer, configs: byte for byte
    a, b = load_file(tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = build_tiny(tmp_path / "other", seed=1)
    c = load_file(other / "model.safetensors")
    assert c.keys() == a.keys()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # Only the weights (and the marker) depend on the seed.
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (other / "config.json").read_bytes() == (tiny / "config.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_cli_in_another_process_writes_the_same_bytes(tiny, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "lcot.toy.tiny", "--output_dir", str(out), "--seed", "0"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    assert _files(out) == _files(tiny)


def test_existing_folder_is_reused_refused_or_replaced(tiny, tmp_path):
    out = build_tiny(tmp_path / "m", seed=0)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(out, seed=0) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    with pytest.raises(FileExistsError, match="seed 0"):
        build_tiny(out, seed=1)
    build_tiny(out, seed=1, overwrite=True)
    assert json.loads((out / BUILT_FILE).read_text())["seed"] == 1
    assert (out / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    (tmp_path / "empty").mkdir()
    assert (build_tiny(tmp_path / "empty") / BUILT_FILE).is_file()  # an empty folder is filled
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="something else"):
        build_tiny(tmp_path / "junk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk", "m"]


def test_config_ids_come_from_the_tokenizer(tiny):
    processor = load_processor(tiny)
    tok = processor.tokenizer
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny)
    cfg, ids = model.config, {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert all(t in tok.all_special_tokens for t in SPECIAL_TOKENS)
    assert cfg.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.text_config.eos_token_id == tok.eos_token_id == ids["<|im_end|>"]
    assert cfg.text_config.pad_token_id == tok.pad_token_id == ids["<|endoftext|>"]
    assert cfg.text_config.bos_token_id == ids["<|endoftext|>"]
    assert model.generation_config.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert model.generation_config.pad_token_id == ids["<|endoftext|>"]
    # vocab_size: len(tokenizer) rounded up to a multiple of 64, with room for the latent tokens.
    assert 1000 <= len(tok) <= 2000
    assert cfg.text_config.vocab_size % 64 == 0 and cfg.text_config.vocab_size >= len(tok) + 3
    assert not [t for t in tok.get_vocab() if "abs_vis" in t]  # latent tokens are added by other code
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size == 128
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 128 // 4 // 2
    assert model.dtype == torch.float32 and cfg._attn_implementation == "sdpa"


@pytest.mark.parametrize("text", [
    QUESTION,
    "How many blue squares are left of the green triangle? Answer: 3.",
    "The total is 12 , not 13 !",  # spaces before punctuation survive (no clean-up on decode)
    "  Two  spaces\nand a new line\n\n",
    "Zebra café ünïcode 🦓 — out of corpus: 4096 × 2",  # byte-level: anything encodes
])
def test_tokenizer_round_trips(tiny, text):
    tok = load_processor(tiny).tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert None not in ids


def test_chat_template_renders_image_placeholder(tiny):
    processor = load_processor(tiny)
    text = processor.apply_chat_template(USER_WITH_IMAGE, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION + "<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert processor.tokenizer.apply_chat_template(USER_WITH_IMAGE, tokenize=False,
                                                   add_generation_prompt=True) == text
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": [{"type": "text", "text": "The total is 3."}]}]
    assert processor.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nThe total is 3.<|im_end|>\n")
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(processor.image_token_id) == 1


def test_112_image_is_16_tokens_and_forward_is_finite(tiny):
    processor = load_processor(tiny)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny).eval()
    text = processor.apply_chat_template(USER_WITH_IMAGE, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=[_image()], return_tensors="pt")
    ids = out["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == 16
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert tuple(out["pixel_values"].shape) == (64, 3 * 2 * 14 * 14)
    assert torch.equal(out["mm_token_type_ids"][0] == 1, ids == model.config.image_token_id)
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape == (1, len(ids), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # Larger images are scaled down to at most max_pixels = 112*112: never more than 16 tokens.
    big = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[_image((400, 300))])
    assert int(big["image_grid_thw"][0].prod()) // 4 <= 16


def test_reload_round_trip_gives_identical_outputs(tiny, tmp_path):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny).eval()
    processor = load_processor(tiny)
    model.save_pretrained(tmp_path / "re")
    processor.save_pretrained(tmp_path / "re")
    assert (tmp_path / "re" / "preprocessor_config.json").is_file()  # stock layout kept
    model2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "re").eval()
    processor2 = LatentVLProcessor.from_pretrained(tmp_path / "re")
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert processor2.chat_template == processor.chat_template == CHAT_TEMPLATE
    assert processor2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    text = processor.apply_chat_template(USER_WITH_IMAGE, tokenize=False, add_generation_prompt=True)
    assert processor2.apply_chat_template(USER_WITH_IMAGE, tokenize=False, add_generation_prompt=True) == text
    a = processor(text=[text], images=[_image()], return_tensors="pt")
    b = processor2(text=[text], images=[_image()], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**a).logits, model2(**b).logits)


def test_load_processor_reads_a_stock_qwen_layout(tiny, tmp_path):
    """A folder as Qwen/Qwen2.5-VL-7B-Instruct ships it: min_pixels/max_pixels keys, a legacy
    chat_template.json, vocab.json + merges.txt, tokenizer_config.json with the template inside."""
    stock = tmp_path / "stock"
    stock.mkdir()
    tj = json.loads((tiny / "tokenizer.json").read_text())
    (stock / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]))
    (stock / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tj["model"]["merges"]) + "\n")
    shutil.copy(tiny / "tokenizer.json", stock / "tokenizer.json")
    (stock / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]), "bos_token": None, "chat_template": "{{ 'old' }}",
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2TokenizerFast", "unk_token": None}))
    (stock / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}))
    (stock / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    class_default = dict(Qwen2VLImageProcessorPil.size)

    processor = load_processor(stock)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (3136, 12845056)
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE  # the processor's file wins
    assert processor.tokenizer.encode(QUESTION) == load_processor(tiny).tokenizer.encode(QUESTION)
    img = _image((448, 448))
    assert processor(text=["<|image_pad|>"], images=[img])["image_grid_thw"].tolist() == [[1, 32, 32]]

    small = load_processor(stock, min_pixels=28 * 28, max_pixels=224 * 224)
    assert small(text=["<|image_pad|>"], images=[img])["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert dict(Qwen2VLImageProcessorPil.size) == class_default  # no class-level state was changed


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_processor(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    shutil.copy(tiny / "preprocessor_config.json", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer\.json"):
        load_processor(tmp_path / "half")
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny, min_pixels=10_000, max_pixels=100)
    with pytest.raises(ValueError, match="images and text only"):
        load_processor(tiny)(text=["<|video_pad|>"], videos=[[_image()] * 2])
