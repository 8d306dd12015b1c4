"""Accuracy (exact match of the normalised final answer) on a JSONL with ground truth, for one or more K."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lcot.data import Record, read_records
from lcot.errors import cli_errors
from lcot.generate import Generation, add_model_args, default_k, generate


def normalise(answer: str) -> str:
    """Lower case, no surrounding space or trailing period, thousands separators dropped, 7.0 -> 7."""
    a = answer.strip().lower().rstrip(".").strip()
    if "####" in a:
        a = a.rsplit("####", 1)[1].strip()
    a = re.sub(r"(?<=\d),(?=\d{3}\b)", "", a)
    try:
        x = float(a)
        return str(int(x)) if x.is_integer() else str(x)
    except ValueError:
        return a


def accuracy(gens: Sequence[Generation], records: Sequence[Record]) -> float:
    truth = {r.idx: normalise(r.final_answer) for r in records}
    return sum(normalise(g.answer) == truth[g.idx] for g in gens) / max(len(gens), 1)


def evaluate(model, processor, records: Sequence[Record], ks: Sequence[int], thought_images: bool = False,
             **kwargs) -> dict:
    """{"accuracy": {K: acc}, "predictions": {K: [...]}} for each K; kwargs go to generate."""
    result: dict = {"thought_images": thought_images, "n": len(records), "accuracy": {}, "predictions": {}}
    for k in ks:
        gens = generate(model, processor, records, k, thought_images=thought_images, **kwargs)
        result["accuracy"][k] = accuracy(gens, records)
        result["predictions"][k] = [{"idx": g.idx, "output": g.text, "answer": g.answer} for g in gens]
    return result


def table(header: Sequence[str], rows: Sequence[Sequence], fmt: str = "{:.3f}") -> str:
    """A plain-text table; floats are formatted with `fmt`, None as '-'."""
    def cell(v) -> str:
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

    cells = [list(header)] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def majority_rate(records: Sequence[Record]) -> float:
    """Accuracy of always answering the most common final answer."""
    counts: dict[str, int] = {}
    for r in records:
        counts[normalise(r.final_answer)] = counts.get(normalise(r.final_answer), 0) + 1
    return max(counts.values()) / len(records)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lcot.evaluate", description=__doc__)
    add_model_args(p)
    p.add_argument("--eval_jsonl", "--test_jsonl", dest="eval_jsonl", required=True,
                   help="JSONL with ground-truth answers")
    p.add_argument("--latent_sizes", type=int, nargs="+", default=None,
                   help="K values to sweep (default: the trained Kmax)")
    p.add_argument("--with_thought_images", action="store_true",
                   help="also report the teacher setting (thought images shown to the latents)")
    p.add_argument("--output", help="write results as JSON here (default: print only)")
    args = p.parse_args(argv)
    from lcot.load import load

    ks = args.latent_sizes or [default_k(args.model_name_or_path)]
    records = read_records(args.eval_jsonl, need_thought_images=args.with_thought_images)
    model, processor = load(args.model_name_or_path, torch.bfloat16 if args.bf16 else torch.float32, args.device,
                            max_pixels=args.max_pixels)
    model.eval()
    settings = [False, True] if args.with_thought_images else [False]
    results = {("with thought images" if t else "without thought images"): evaluate(
        model, processor, records, ks, thought_images=t, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens) for t in settings}
    print(table(["setting", *[f"K={k}" for k in ks]], [[name, *r["accuracy"].values()] for name, r in results.items()]))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
