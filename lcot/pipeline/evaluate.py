"""Accuracy (exact match of the normalised final answer) on a JSONL with ground truth, for one or more K.

Numbers that show nothing say so where they are printed: a model that gives one answer to every record
is marked as a constant predictor, and a thought-image benefit (accuracy with thought images minus
without) near zero is flagged, since alignment to such a teacher teaches nothing.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lcot import config
from lcot.config import option
from lcot.console import quiet_libraries
from lcot.core.record import Record
from lcot.errors import cli_errors
from lcot.io import write_json
from lcot.pipeline.data import read_records
from lcot.pipeline.generate import Generation, ModelOptions, choose_ks, generate, trained_feed, trained_visibility

BENEFIT_NEAR_ZERO = 0.05  # a thought-image benefit below this is reported as "near zero"


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


def constant_answer(answers: Sequence[str]) -> str | None:
    """The one answer given to every record (normalised), or None when the answers vary (or are < 2)."""
    found = {normalise(a) for a in answers}
    return found.pop() if len(answers) > 1 and len(found) == 1 else None


def describe(acc: float, answers: Sequence[str], majority: float | None = None) -> str:
    """An accuracy as printed: '0.412', or '0.146 (answers "1" for every record)' for a constant predictor, or
    '0.150 (not above the majority-answer rate)' when `majority` is given and not beaten by 0.02."""
    const = constant_answer(answers)
    if const is not None:
        return f'{acc:.3f} (answers "{const}" for every record)'
    if majority is not None and acc <= majority + 0.02:
        return f"{acc:.3f} (not above the majority-answer rate)"
    return f"{acc:.3f}"


def by_group(correct: Sequence[bool], groups: Sequence) -> dict:
    """{group value: accuracy} over the records of each group, sorted by group."""
    out: dict = {}
    for g in sorted(set(groups), key=str):
        hits = [c for c, gg in zip(correct, groups) if gg == g]
        out[g] = sum(hits) / len(hits)
    return out


def evaluate(model, processor, records: Sequence[Record], ks: Sequence[int], thought_images: bool = False,
             difficulty: str | None = None, **kwargs) -> dict:
    """{"accuracy": {K: acc}, "predictions": {K: [...]}, "constant": {K: answer or None}} for each K.

    difficulty: an extra JSONL field (e.g. "hops"); adds "by_difficulty": {K: {value: acc}}.
    kwargs go to generate (feed, visual_cot, batch_size, ...).
    """
    result: dict = {"thought_images": thought_images, "n": len(records), "accuracy": {}, "predictions": {},
                    "constant": {}}
    if difficulty:
        result["by_difficulty"] = {}
    truth = {r.idx: normalise(r.final_answer) for r in records}
    for k in ks:
        gens = generate(model, processor, records, k, thought_images=thought_images, **kwargs)
        result["accuracy"][k] = accuracy(gens, records)
        result["constant"][k] = constant_answer([g.answer for g in gens])
        result["predictions"][k] = [{"idx": g.idx, "output": g.text, "answer": g.answer} for g in gens]
        if difficulty:
            correct = [normalise(g.answer) == truth[g.idx] for g in gens]
            result["by_difficulty"][k] = by_group(correct, [r.extra.get(difficulty) for r in records])
    return result


def benefit_line(with_acc: float, without_acc: float, what: str = "teacher", teacher: bool = True) -> str:
    """The thought-image benefit (accuracy with minus without), with a plain warning when it is near zero."""
    gain = with_acc - without_acc
    line = f"{what} thought-image benefit: {gain:+.3f} (accuracy {with_acc:.3f} with thought images, " \
           f"{without_acc:.3f} without)"
    if gain < BENEFIT_NEAR_ZERO:
        line += f"\nWARNING: the thought-image benefit is near zero (< {BENEFIT_NEAR_ZERO}): this model does not " + (
            "use its thought images, so aligning latents to it teaches nothing it could not learn without them"
            if teacher else "read its thought images")
    return line


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


@dataclass
class EvaluateConfig(ModelOptions):
    """The flags of `python -m lcot.pipeline.evaluate`."""

    eval_jsonl: str = option("", "JSONL with ground-truth answers", aliases=("--test_jsonl",), required=True)
    latent_sizes: list[int] | None = option(None, "K values to sweep (None: the trained Kmax)")
    with_thought_images: bool = option(False, "also report the teacher setting (thought images shown to the latents)")
    visual_cot: bool = option(False, "with thought images, show them to the answer too (the visual-CoT upper "
                              "bound; the default for a model trained with --stage vcot)")
    difficulty_field: str | None = option(None, "an extra JSONL field to break accuracy down by (e.g. hops)")
    output: str | None = option(None, "write results as JSON here (None: print only)")


PROG = "python -m lcot.pipeline.evaluate"


def parser() -> argparse.ArgumentParser:
    return config.parser(EvaluateConfig, PROG, __doc__)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = config.parse(EvaluateConfig, argv, PROG, __doc__)
    quiet_libraries(args.verbose)
    from lcot.pipeline.runs import read_lcot_config

    args.check()
    ks = choose_ks(args.model_name_or_path, args.latent_sizes, "--latent_sizes")
    records = read_records(args.eval_jsonl, need_thought_images=args.with_thought_images)
    model, processor = args.load()
    model.eval()
    visual_cot = args.visual_cot or read_lcot_config(args.model_name_or_path).get("stage") == "vcot"
    settings = [False, True] if args.with_thought_images else [False]
    results = {("with thought images" if t else "without thought images"): evaluate(
        model, processor, records, ks, thought_images=t, batch_size=args.batch_size, difficulty=args.difficulty_field,
        max_new_tokens=args.max_new_tokens, feed=trained_feed(args.model_name_or_path), visual_cot=visual_cot and t,
        visibility=trained_visibility(args.model_name_or_path))
        for t in settings}
    rows = [[name, *[describe(r["accuracy"][k], [x["answer"] for x in r["predictions"][k]]) for k in ks]]
            for name, r in results.items()]
    print(table(["setting", *[f"K={k}" for k in ks]], rows))
    print(f"majority-answer rate: {majority_rate(records):.3f}")
    if args.difficulty_field:
        for name, r in results.items():
            diffs = sorted({d for k in ks for d in r["by_difficulty"][k]}, key=str)
            print(f"\n{name}, by {args.difficulty_field}:")
            print(table([args.difficulty_field, *[f"K={k}" for k in ks]],
                        [[d, *[r["by_difficulty"][k].get(d) for k in ks]] for d in diffs]))
    if args.with_thought_images:
        for k in ks:
            print(benefit_line(results["with thought images"]["accuracy"][k],
                               results["without thought images"]["accuracy"][k], f"K={k}:"))
    if args.output:
        write_json(args.output, results, indent=1)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
