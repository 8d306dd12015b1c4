"""Generation: question (+ question images) in, `<abs_vis_token>` K latents `</abs_vis_token>\\n{answer}` out.

Batched, with a KV cache, greedy by default. The latent steps are the same `latent_step` training
and teacher precompute use, on a batch from the same collator, so the latents equal training's (with lcot.fast's
runner on a GPU it is replayed as a CUDA graph on a static cache, decoding steps too: see lcot.fast.graph).
<abs_vis_token> and </abs_vis_token> are placed, not sampled (the model is trained to emit them), and
the answer may not contain latent tokens: their logits are masked while decoding it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lcot import config
from lcot.config import SpeedConfig, option
from lcot.console import progress as bar
from lcot.console import quiet_libraries
from lcot.core.collate import Collator
from lcot.core.latent import Passes, embed_inputs, passes_of
from lcot.core.record import Record
from lcot.core.tokens import LATENT_END, LATENT_PAD, LATENT_START
from lcot.errors import LcotInputError, check_counts, check_output, cli_errors
from lcot.io import to_device, write_atomic
from lcot.pipeline.data import question_record, read_records


@dataclass
class Generation:
    idx: int
    k: int
    raw: str  # the decoded text after </abs_vis_token> (normally "\n{answer}")
    latents: torch.Tensor  # (K, H): the outputs at the latent slots

    @property
    def answer(self) -> str:
        return self.raw.strip()

    @property
    def text(self) -> str:
        return f"{LATENT_START}{LATENT_PAD * self.k}{LATENT_END}{self.raw}"

    @property
    def short(self) -> str:
        """The K latent tokens counted, not spelled out: `<abs_vis_token>[32 latents]</abs_vis_token> 7`."""
        return f"{LATENT_START}[{self.k} latent{'s' if self.k != 1 else ''}]{LATENT_END} {self.answer}"


def _next_token(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Phases:
    """Wall time of generation's phases (synchronised on CUDA), only when the caller asks for it."""

    def __init__(self, out: dict | None, device: torch.device) -> None:
        self.out, self.device = out, device
        self.t = self._now() if out is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __call__(self, name: str, steps: int | None = None) -> None:
        if self.out is None:
            return
        t = self._now()
        self.out[f"{name}_s"] = t - self.t
        if steps is not None:
            self.out[f"{name}_steps"] = steps
        self.t = t


@torch.no_grad()
def generate_batch(model, processor, records: Sequence[Record], num_latents: int, max_new_tokens: int = 32,
                   question_images: bool = True, thought_images: bool = False, temperature: float = 0.0,
                   latent_inputs: torch.Tensor | None = None, seed: int = 0, runner: Passes | None = None,
                   timings: dict | None = None, feed: str = "continuous", visual_cot: bool = False,
                   visibility: str = "all") -> list[Generation]:
    """One batch. `latent_inputs` (B, K, H), if given, replaces the fed-back latents (causal-use checks).

    feed: "continuous" (the method) or "pause" (the control: slots take the <abs_vis_token_pad> embedding);
    visual_cot: with thought images, show them to the answer too (the visual-CoT upper bound); visibility: which
    thought image each latent slot sees (lcot.core.mask; the model's own: `trained_setting`).

    runner: how the passes run (default: the model's; lcot.fast's replays latent and decoding steps alike as CUDA
    graphs on a GPU). `timings`, if a dict, receives the seconds of the phases (prefix_s, latents_s, decode_s) and
    their step counts.
    """
    passes = runner or passes_of(model)
    collate = Collator(processor, model.config, num_latents, thought_images=thought_images,
                       question_images=question_images, with_answer=False, reserve=max_new_tokens,
                       visual_cot=visual_cot, visibility=visibility)
    b = to_device(collate(records), model.device)
    mask, pos, s = b["attention_mask_4d"], b["position_ids"], b["latent_start"]
    clock = _Phases(timings, model.device)
    embeds = embed_inputs(model, b["input_ids"], b["pixel_values"], b["image_grid_thw"], vision=passes.vision(model))
    steps = passes.recurrence(model, len(records), b["input_ids"].shape[1])
    h = steps.forward(embeds[:, :s], mask, pos, slice(0, s))[:, -1:]
    clock("prefix")
    if latent_inputs is None and feed == "pause":
        latent_inputs = embeds[:, s:s + num_latents]
    if latent_inputs is None:
        _, latents = steps.run(h, mask, pos, s, num_latents)
    else:
        latents = steps.forward(latent_inputs.to(embeds.dtype), mask, pos, slice(s, s + num_latents))
    clock("latents", num_latents)
    embed = model.get_input_embeddings()
    gen = torch.Generator(device=model.device).manual_seed(seed) if temperature > 0 else None
    tok = b["input_ids"][:, s + num_latents]  # </abs_vis_token>
    im_end, ids = collate.ids.im_end, collate.ids
    banned = torch.tensor([ids.latent_start, ids.latent_end, ids.latent_pad], device=model.device)
    out = torch.full((len(records), max_new_tokens), collate.ids.pad, dtype=torch.long, device=model.device)
    done = torch.zeros(len(records), dtype=torch.bool, device=model.device)
    t = 0
    for t in range(max_new_tokens):
        h = steps.step(embed(tok[:, None]), mask, pos, s + num_latents + t)
        logits = model.lm_head(h[:, -1]).index_fill(-1, banned, float("-inf"))
        tok = torch.where(done, collate.ids.pad, _next_token(logits, temperature, gen))
        out[:, t] = tok
        done |= tok == im_end
        if done.all():
            break
    clock("decode", t + 1 if max_new_tokens else 0)
    results = []
    for i, rec in enumerate(records):
        ids = out[i].tolist()
        ids = ids[: ids.index(im_end)] if im_end in ids else ids
        text = processor.tokenizer.decode(ids, skip_special_tokens=True)
        results.append(Generation(rec.idx, num_latents, text, latents[i].float().cpu()))
    return results


def generate(model, processor, records: Sequence[Record], num_latents: int, batch_size: int = 8, progress: bool = True,
             **kwargs) -> list[Generation]:
    """All records, in batches, with a progress bar. kwargs go to generate_batch."""
    results: list[Generation] = []
    for start in bar(range(0, len(records), batch_size), desc=f"generate K={num_latents}", disable=not progress):
        results += generate_batch(model, processor, records[start:start + batch_size], num_latents, **kwargs)
    return results


@dataclass
class ModelOptions(SpeedConfig):
    """How generate and evaluate load and run a model (their shared flags, the speed flags among them)."""

    model_name_or_path: str = option(None, "a local checkpoint folder (from lcot.main or a real Qwen2.5-VL)",
                                     required=True)
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "where the model runs")
    bf16: bool = option(False, "load the model in bfloat16")
    max_pixels: int | None = option(None, "image processor max_pixels (None: the model's)")
    batch_size: int = option(8, "records per generate call")
    max_new_tokens: int = option(32, "answer tokens at most")
    verbose: bool = option(False, "print everything transformers prints (its bars at each model load)",
                           aliases=("-v",))

    def check(self) -> None:
        """Refuse flags that cannot work before the model loads: no model folder, counts below their least."""
        from lcot.pipeline.load import check_model_folder

        check_model_folder(self.model_name_or_path)
        check_counts([("--batch_size", self.batch_size, 1, "it is the number of records per generate call"),
                      ("--max_new_tokens", self.max_new_tokens, 0, "it is the number of answer tokens at most")])
        output = getattr(self, "output", None)
        if output:
            check_output("--output", output, folder=False)

    def load(self):
        from lcot.pipeline.load import load

        return load(self.model_name_or_path, torch.bfloat16 if self.bf16 else torch.float32, self.device,
                    max_pixels=self.max_pixels, speed=self)


@dataclass
class GenerateConfig(ModelOptions):
    """The flags of `python -m lcot.pipeline.generate`."""

    jsonl: str | None = option(None, "records to answer (their answers are ignored); or use --question")
    question: str | None = option(None, "one question, answered without images unless --image is given")
    image: list[str] = option([], "a question image (repeatable, in order)")
    num_latents: int | None = option(None, "K latent steps (None: the trained Kmax)", flag="latent_size",
                                     aliases=("-k",))
    temperature: float = option(0.0, "0 = greedy")
    output: str | None = option(None, "write the generations as JSONL here")
    raw: bool = option(False, "print each output as decoded, all K latent tokens spelled out, instead of "
                       "`<abs_vis_token>[K latents]</abs_vis_token> answer` (--output always holds the decoded text)")


DEFAULT_K = 32  # K for a model without lcot.json (the seed's --latent_size)


def choose_ks(model_path: str, given: Sequence[int] | None, flag: str = "--latent_size") -> list[int]:
    """The K values to run: those given, each at most the K the model was trained with (num_latents in its
    lcot.json); none given, the trained K. Without lcot.json, DEFAULT_K, and a note on stderr says so."""
    from lcot.pipeline.runs import LCOT_CONFIG, read_lcot_config

    trained = read_lcot_config(model_path).get("num_latents")
    for k in given or ():
        if k < 0:
            raise LcotInputError(flag, f"must be >= 0, got {k}", "K is the number of latent steps")
        if trained is not None and k > trained:
            raise LcotInputError(flag, f"{k} is above the {trained} latent steps {model_path} was trained with "
                                 f"(num_latents in its {LCOT_CONFIG})", f"pass {flag} {trained} or less")
    if given:
        return list(given)
    if trained is None:
        print(f"lcot: note: no {LCOT_CONFIG} in {model_path}: using {flag} {DEFAULT_K}, the default; pass {flag} "
              "to choose", file=sys.stderr)
        return [DEFAULT_K]
    return [int(trained)]


def trained_feed(model_path: str) -> str:
    """How the model's latent slots were fed in training ("continuous" unless lcot.json says "pause")."""
    from lcot.pipeline.runs import read_lcot_config

    return read_lcot_config(model_path).get("latent_feed", "continuous")


def trained_visibility(model_path: str) -> str:
    """Which thought image each latent slot saw in training (lcot.json; "all" for models that record none)."""
    from lcot.pipeline.runs import read_lcot_config

    return read_lcot_config(model_path).get("thought_visibility", "all")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    prog = "python -m lcot.pipeline.generate"
    args = config.parse(GenerateConfig, argv, prog, __doc__)
    quiet_libraries(args.verbose)
    if bool(args.jsonl) == bool(args.question):
        config.parser(GenerateConfig, prog).error("give exactly one of --jsonl and --question")
    args.check()
    records = read_records(args.jsonl) if args.jsonl else [question_record(args.question, args.image)]
    [k] = choose_ks(args.model_name_or_path, None if args.num_latents is None else [args.num_latents])
    model, processor = args.load()
    gens = generate(model.eval(), processor, records, k, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    feed=trained_feed(args.model_name_or_path))
    rows = [{"idx": g.idx, "k": g.k, "output": g.text, "answer": g.answer} for g in gens]
    for g in gens:
        print(f"[{g.idx}] {g.text if args.raw else g.short}")
    if args.output:
        write_atomic(args.output, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
