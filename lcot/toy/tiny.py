"""A tiny, randomly initialised Qwen2.5-VL with its own tokenizer, built offline and deterministically.

The folder it writes is laid out like a stock Qwen2.5-VL checkpoint (config.json, generation_config.json,
model.safetensors, tokenizer files, chat_template.jinja, preprocessor_config.json), so every code path
that loads a real checkpoint can run on it in seconds on a CPU.

Numbers chosen:

- Text model: 2 layers, hidden 128, 4 heads (head_dim 32), 2 KV heads, MLP 256, M-RoPE sections
  [4, 6, 6] (sum 16 = head_dim / 2), rope_theta 1e6, untied embeddings (as the 7B), fp32, sdpa.
- Vision tower: depth 2, hidden 64, 4 heads, MLP 128, patch 14, temporal patch 2, spatial merge 2,
  out_hidden_size 128 (= text hidden). window_size 56 px = 2x2 merged tokens per window, so a
  112x112 image has 4 windows and window attention is really exercised; block 0 is windowed,
  block 1 (fullatt_block_indexes=[1]) attends over the whole image, as the last block of each
  group does in the real model.
- Image processor: min_pixels = 56*56 = 3136, max_pixels = 112*112 = 12544. A 112x112 image stays
  112x112 (sides are multiples of 28 = patch 14 x merge 2): an 8x8 patch grid, image_grid_thw
  [1, 8, 8], 64 rows of pixel_values (3*2*14*14 = 1176 values each) and 64 / (2*2) = 16
  <|image_pad|> tokens. Larger images are scaled down to at most 12544 pixels (16 tokens at most).
- Tokenizer: byte-level BPE trained here on `CORPUS` with Qwen's pre-tokenizer, 1024 entries (256
  bytes + 768 merges), then Qwen's special tokens at ids 1024.. in Qwen's order: <|endoftext|>,
  <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>, so
  len(tokenizer) = 1031. The model's vocab_size is len(tokenizer) rounded up to a multiple of 64
  (1088), leaving spare rows as the real checkpoint does (151665 tokens, 152064 rows), so adding the
  latent tokens needs no resize. eos = <|im_end|>, pad = <|endoftext|>, no bos or unk (as Qwen).
  Every id in the model config is looked up from the tokenizer by string.

The latent tokens (<abs_vis_token> ...) are deliberately absent: `lcot.core.tokens.add_latent_tokens`
adds them, as it does for a real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lcot import config
from lcot.config import option
from lcot.console import quiet_libraries
from lcot.errors import LcotInputError, check_output, cli_errors
from lcot.io import build_folder

# Bump when anything written changes, so folders built by an older version are rebuilt.
TINY_VERSION = 1
BUILT_FILE = "lcot_tiny.json"  # what and how build_tiny built (marks a complete folder)

BPE_VOCAB_SIZE = 1024
VOCAB_MULTIPLE = 64
MIN_PIXELS = 56 * 56  # 3136
MAX_PIXELS = 112 * 112  # 12544: a 112x112 image is an 8x8 patch grid = 16 LLM tokens
SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's special tokens used by Qwen2.5-VL, in the order of their ids in the real tokenizer.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")

# Local training text for the BPE: words of short visual-reasoning questions and answers, digits,
# punctuation and the chat-template words. Only the tokenizer's granularity depends on it: any
# text still encodes, as every byte has a token of its own (byte-level BPE).
CORPUS = """\
How many red circles are in the image? Count the shapes, then answer.
How many blue squares are there? The total is 4.
How many green triangles are left of the yellow star? Answer: 2.
What colour is the largest shape? What color is the smallest object?
Which shape is above the purple hexagon? Is there a cube behind the sphere?
Count the objects in each row and column of the grid, then add them up.
Look at the picture carefully. Think step by step before you answer.
The final answer is 7. There are 3 circles, 2 squares and 1 triangle, so the total is 6.
system
user
assistant
You are a helpful assistant.
red blue green yellow orange purple black white gray grey brown pink cyan magenta gold silver
circle circles square squares triangle triangles rectangle rectangles star stars hexagon hexagons
pentagon diamond diamonds oval ovals ellipse line lines dot dots shape shapes object objects cube cubes
sphere spheres cylinder cylinders ball balls block blocks arrow arrows cross crosses heart hearts ring rings
small large big tiny huge medium larger smaller largest smallest bigger biggest long short tall wide narrow
left right above below top bottom middle center centre next to behind front inside outside between near far
under over corner corners edge edges row rows column columns grid cell cells side sides
how many count counts counted counting number numbers total sum more fewer less than same equal most least
first second third fourth last each every all none any both only other another
one two three four five six seven eight nine ten eleven twelve zero hundred
what which where who why when is are was were does do did can could should would will has have had
there their this that these those it its of in on at by with from and or not no yes if then so
answer answers the a an final step steps think thinking reason reasoning look looking image images picture
pictures photo figure scene diagram chart graph table panel view
find compare identify describe add subtract multiply divide move moved rotate rotated flip flipped reflect
match matches connect draw drawn colour colours color colors colored coloured fill filled shade shaded see
seen contain contains appear appears hold holds touch touching overlap overlapping visible hidden
plus minus times equals half double twice pattern patterns sequence missing piece pieces puzzle maze path
shortest longest closest nearest furthest metal rubber shiny matte solid striped empty full
you are helpful please carefully question questions choose option options
because therefore after before again also only exactly about around approximately
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100
? . , : ; ! ( ) [ ] { } - + = / * ' " % # < > _ ...

"""

# Renders like Qwen2.5-VL's template: a default system turn when none is given, then
# <|im_start|>{role}\n{content}<|im_end|>\n per message; content is a string or a list of items,
# an image item becomes <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item -%}"
    "{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)


def build_tokenizer():
    """Qwen2Tokenizer from a byte-level BPE trained on `CORPUS` (deterministic: no randomness involved)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # Also each word at the start of a line (no leading space) and capitalised, as questions begin.
    words = CORPUS.split()
    bpe.train_from_iterator([CORPUS, "\n".join(words), " ".join(w.capitalize() for w in words)], trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]

    # The constructor adds its unk/eos/pad as special tokens: give it only <|endoftext|> so that it
    # takes the first id after the BPE vocab, then add the others in Qwen's order.
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None, bos_token=None,
                         eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
                         clean_up_tokenization_spaces=False, model_max_length=32768)
    tok.add_special_tokens({"extra_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    got = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    if got != list(range(BPE_VOCAB_SIZE, BPE_VOCAB_SIZE + len(SPECIAL_TOKENS))):  # the layout documented above
        raise RuntimeError(f"unexpected special token ids {got}: did CORPUS shrink below {BPE_VOCAB_SIZE} entries?")
    return tok


# Random model shapes for offline work, all with the tiny tokenizer. "tiny" (~1M parameters) is the default of
# tests, notebooks and the demo; "8m" (~8M: 6 text layers, hidden 256; vision depth 4) is the small
# from-scratch testbed of lcot.experiment on a GPU (both: head_dim 32, M-RoPE sections [4, 6, 6]).
_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31])
SHAPES = {  # text and vision sizes; vocab_size None: the tiny tokenizer's, rounded up to VOCAB_MULTIPLE
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, mrope_section=[4, 6, 6]),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1],
                             window_size=56),
                 vocab_size=None, tie_word_embeddings=False, max_position_embeddings=32768),
    "8m": dict(text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, mrope_section=[4, 6, 6]),
               vision=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=4, fullatt_block_indexes=[1, 3],
                           window_size=56),
               vocab_size=None, tie_word_embeddings=False, max_position_embeddings=32768),
    # benchmark shapes (benchmarks/bench.py): Qwen2.5-0.5B's text sizes with a small vision tower, and
    # Qwen2.5-VL-3B/7B-Instruct's published sizes (their config.json)
    "small": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, mrope_section=[8, 12, 12]),
                  vision=dict(depth=8, hidden_size=640, intermediate_size=1710, num_heads=10, window_size=112,
                              fullatt_block_indexes=[3, 7]),
                  vocab_size=None, tie_word_embeddings=True, max_position_embeddings=128000),
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, mrope_section=[16, 24, 24]),
               vision=_QWEN_VISION, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=128000),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, mrope_section=[16, 24, 24]),
               vision=_QWEN_VISION, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=128000),
}
BUILT = ("tiny", "8m")  # the shapes `python -m lcot.toy.tiny` writes to disk (the others: benchmarks/bench.py)


def random_config(shape: str, tok):
    """A Qwen2_5_VLConfig of the named shape whose special-token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    def tid(token: str) -> int:
        i = tok.convert_tokens_to_ids(token)
        if not isinstance(i, int):
            raise KeyError(f"{token!r} missing from the tokenizer")
        return i

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    size = SHAPES[shape]
    text = dict(size["text"])
    mrope = text.pop("mrope_section")
    vocab = size["vocab_size"] or -(-len(tok) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    pad, eos = tid("<|endoftext|>"), tid("<|im_end|>")
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, max_position_embeddings=size["max_position_embeddings"], rms_norm_eps=1e-6,
            max_window_layers=text["num_hidden_layers"], hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
            bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=size["tie_word_embeddings"],
            **text),
        vision_config=dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=text["hidden_size"], tokens_per_second=2, hidden_act="silu",
                           **size["vision"]),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=size["tie_word_embeddings"])


def _write(out: Path, seed: int, shape: str = "tiny") -> None:
    """Write the whole checkpoint into the (empty) folder `out`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from lcot.pipeline.processor import LatentVLProcessor

    tok = build_tokenizer()
    config = random_config(shape, tok)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                dtype=torch.float32)
    pad, eos = config.text_config.pad_token_id, config.text_config.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=pad, pad_token_id=pad, eos_token_id=[eos, pad],
                                               do_sample=False)
    model.save_pretrained(out)
    # An explicit size: see lcot.pipeline.processor (the min_pixels keyword alone mutates a class default).
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    LatentVLProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE).save_pretrained(out)
    marker = {"builder": "lcot.tiny", "version": TINY_VERSION, "seed": seed}
    if shape != "tiny":
        marker["shape"] = shape
    (out / BUILT_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    # mkdtemp makes the folder private and some files come out 0600: use ordinary modes.
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o755 if f.is_dir() else 0o644)


def _built_with(path: Path) -> dict | None:
    try:
        return json.loads((path / BUILT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(path: Path, seed: int, shape: str = "tiny") -> bool:
    found = _built_with(path)
    return isinstance(found, dict) and found == {"builder": "lcot.tiny", "version": TINY_VERSION, "seed": seed,
                                                 **({"shape": shape} if shape != "tiny" else {})}


def build_tiny(output_dir: str | Path, seed: int = 0, overwrite: bool = False, shape: str = "tiny") -> Path:
    """Write the tiny checkpoint to `output_dir` (offline, a few seconds) and return its path.

    Same seed, same bytes: weights and tokenizer files are identical from build to build. The
    folder is built in a temporary sibling and renamed into place, so an interrupted build leaves
    no half-written `output_dir`. If `output_dir` already holds a tiny model of this version built
    with this seed, it is returned as is. Any other non-empty `output_dir` is an error unless
    `overwrite` is set, which replaces it.
    """
    out = Path(output_dir).absolute()
    if shape not in BUILT:
        raise ValueError(f"shape must be one of {BUILT}, got {shape!r}")
    if _is_complete(out, seed, shape):
        return out
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        found = _built_with(out)
        what = (f"a tiny model built with seed {found.get('seed')} (version {found.get('version')})"
                if isinstance(found, dict) else "something else")
        raise FileExistsError(f"{out} already holds {what}; pass overwrite=True (--overwrite) to replace it")
    # a concurrent build of the same seed is as good as ours
    return build_folder(out, lambda tmp: _write(tmp, seed, shape), lambda found: _is_complete(found, seed, shape))


@dataclass
class TinyConfig:
    """The flags of `python -m lcot.toy.tiny`."""

    output_dir: str = option(help="folder to write (created atomically)")
    seed: int = option(0, "seed of the weight init; same seed, same bytes")
    overwrite: bool = option(False, "replace OUTPUT_DIR if it holds something else")
    shape: str = option("tiny", "tiny: ~1M parameters (tests, demo); 8m: ~8M, 6 text layers (the GPU testbed)",
                        choices=BUILT)
    verbose: bool = option(False, "print everything transformers prints (its bars at each save)", aliases=("-v",))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    prog = "python -m lcot.toy.tiny"
    about = ("Write a tiny randomly initialised Qwen2.5-VL (about 1M parameters, fp32) with its tokenizer and "
             "processor, offline and deterministically, in Hugging Face format. Load it like a real checkpoint, "
             "e.g. with lcot.pipeline.load.load(DIR).")
    args = config.parse(TinyConfig, argv, prog, about)
    quiet_libraries(args.verbose)
    check_output("--output_dir", args.output_dir)
    try:
        path = build_tiny(args.output_dir, seed=args.seed, overwrite=args.overwrite, shape=args.shape)
    except FileExistsError as err:
        raise LcotInputError("--output_dir", str(err).partition("; ")[0],
                             "pass --overwrite to replace it, or choose another folder") from None
    print(f"{args.shape} Qwen2.5-VL (seed {args.seed}) in {path}")


if __name__ == "__main__":
    main()
