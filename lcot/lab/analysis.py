"""Measurements the notebooks show: the mask rule read off a batch, the bottleneck check, teacher-latent
statistics, latent-teacher cosine per K, accuracy per stage and K, and the causal-use check.

Everything runs through the kit's own pieces (the collator, `latent_hidden_states`, `generate_batch`,
`evaluate`, `per_position_cosine`), so what is measured is what training and inference compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcot.core.collate import Collator
from lcot.core.loss import per_position_cosine
from lcot.core.mask import Seg
from lcot.core.model import latent_hidden_states
from lcot.core.record import Record
from lcot.io import to_device
from lcot.lab.segments import PART_NAMES, PARTS, display_segments
from lcot.pipeline.evaluate import (
    BENEFIT_NEAR_ZERO,
    accuracy,
    benefit_line,
    constant_answer,
    describe,
    evaluate,
    majority_rate,
    table,
)
from lcot.pipeline.generate import generate_batch
from lcot.pipeline.teacher import read_teacher, teacher_file


def _run(model, b: dict, pixel_values: torch.Tensor | None = None, feed: str = "continuous"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    if pixel_values is not None:  # e.g. thought images blanked
        b = {**b, "pixel_values": pixel_values, "pixel_lut": None}
    return latent_hidden_states(model, b, feed=feed)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


# -- the mask rule, read off a collated batch ---------------------------------------------------------
def segment_access(batch: dict, row: int = 0) -> dict[tuple[Seg, Seg], float]:
    """{(query part, key part): share of the causally earlier-or-equal keys the query may attend}.

    Read off the batch's own 4D mask, so the table states the rule as the model receives it. The parts are
    the display parts (`lcot.lab.segments`): the latent delimiters are "latent markers", not answer tokens.
    """
    mask, seg = batch["attention_mask_4d"][row, 0].cpu(), display_segments(batch)[row].cpu()
    length = seg.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    out = {}
    present = [s for s in PARTS if (seg == s).any()]
    for q in present:
        for k in present:
            pairs = causal & (seg == q)[:, None] & (seg == k)[None, :]
            if pairs.any():
                out[(q, k)] = mask[pairs].float().mean().item()
    return out


def access_table(batch: dict, row: int = 0) -> str:
    """`segment_access` as a query x key table (share of earlier keys visible; '-' = no such pair)."""
    acc = segment_access(batch, row)
    segs = [s for s in PARTS if any(s in pair for pair in acc)]
    rows = [[f"query: {PART_NAMES[q]}"] + [acc.get((q, k)) for k in segs] for q in segs]
    return table(["", *[f"key: {PART_NAMES[k]}" for k in segs]], rows, fmt="{:.2f}")


# -- the bottleneck check -----------------------------------------------------------------------------
def thought_pixel_rows(records: Sequence[Record], image_grid_thw: torch.Tensor, question_images: bool = True
                       ) -> torch.Tensor:
    """Bool over the rows of the batch's pixel_values: True on rows that belong to a thought image.

    The collator lists each record's question images, then its thought images, record after record.
    """
    flags = []
    for rec in records:
        flags += [False] * (len(rec.question_images) if question_images else 0) + [True] * len(rec.thought_images)
    rows_per_image = image_grid_thw.prod(-1).tolist()
    if len(rows_per_image) != len(flags):
        raise ValueError(f"{len(rows_per_image)} images in the batch, {len(flags)} expected from the records")
    return torch.tensor([f for f, n in zip(flags, rows_per_image) for _ in range(int(n))], dtype=torch.bool)


@torch.no_grad()
def bottleneck_check(model, processor, records: Sequence[Record], num_latents: int, seed: int = 0
                     ) -> dict[str, float | None]:
    """Replace the thought images' pixels by noise; {segment name: max |change| of any hidden state}.

    With thought images shown (stage2 / teacher setting) and the 4D mask, the rule predicts: prompt,
    question image and answer states do not move at K=0 (no latent slot can carry the images'
    content), the latents move at K>0 (they see the images), and through them so does the answer.
    """
    b = to_device(Collator(processor, model.config, num_latents, thought_images=True)(records), model.device)
    rows = thought_pixel_rows(records, b["image_grid_thw"].cpu()).to(model.device)
    noisy = b["pixel_values"].clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noisy[rows] = torch.randn(noisy[rows].shape, generator=gen).to(noisy)
    h0, _ = _run(model, b)
    h1, _ = _run(model, b, noisy)
    change = (h1.float() - h0.float()).abs().amax(-1)  # (B, L)
    seg = display_segments(b)
    return {PART_NAMES[s]: (change[seg == s].max().item() if (seg == s).any() else None)
            for s in PARTS if s != Seg.PAD}


# -- degenerate results: each measurement says so where its number is printed --------------------------
COLLAPSE_COSINE = 0.99  # mean cosine between different records' latents above this: collapsed
IDENTICAL_SHARE = 0.02  # record-specific part below this share of the norm: one vector for every record
NEAR_MAJORITY = 0.02  # an accuracy within this of the majority-answer rate shows nothing
SAME_AS_OTHER = 0.01  # cosine to the own teacher minus to another record's below this: nothing specific matched


def collapse_warning(latents: torch.Tensor) -> str | None:
    """A warning when (N, K, H) latents barely depend on the record, else None.

    Flagged when the mean cosine between different records' latents at one position is above COLLAPSE_COSINE.
    Two cases are told apart by the record-specific part (each latent minus the records' mean latent at its
    position, as a share of its norm): below IDENTICAL_SHARE the latents are one vector for every record
    (collapse: nothing to align to or read); above it one shared direction dominates, the case where a plain
    cosine is ~1 whatever the record and `--align centered` / a probe still find what differs.
    """
    if latents.shape[0] < 2:
        return None
    across = cosine_across(latents).mean().item()
    if not across > COLLAPSE_COSINE:
        return None
    x = latents.float()
    norms = x.norm(dim=-1)
    spread = (norms.std(0) / norms.mean(0).clamp_min(1e-12)).max().item()
    specific = ((x - x.mean(0, keepdim=True)).norm(dim=-1) / norms.clamp_min(1e-12)).mean().item()
    numbers = (f"mean cosine between records {across:.3f} (1 = identical), norm std {spread:.3f} of the mean, "
               f"record-specific part {specific:.1%} of the norm")
    if specific < IDENTICAL_SHARE:
        return (f"WARNING: collapsed latents: {numbers}: every record gets (nearly) the same vector, so they carry "
                "nothing record-specific; aligning to them, or reading them, shows no reasoning")
    return (f"WARNING: one record-independent direction dominates these latents: {numbers}: a plain cosine to them "
            "is ~1 whatever the record (align with --align centered; read them with a probe, not a cosine)")


def constant_warning(answers: Sequence[str], majority: float | None = None, what: str = "the model") -> str | None:
    """A warning when one answer is given to every record (a constant predictor), else None."""
    const = constant_answer(answers)
    if const is None:
        return None
    rate = f"; the majority-answer rate is {majority:.3f}" if majority is not None else ""
    return (f'WARNING: {what} answers "{const}" for every record (a constant predictor{rate}): its accuracy is '
            f'how often "{const}" is right, not a sign that it reads the question')


def accuracy_cell(acc: float, answers: Sequence[str], majority: float | None = None) -> str:
    """`describe`'s accuracy text, with the majority-answer rate beside a constant predictor's accuracy:
    '0.146 (answers "1" for every record; majority-answer rate 0.183)'."""
    text = describe(acc, answers, majority)
    if majority is not None and constant_answer(answers) is not None:
        text = f"{text[:-1]}; majority-answer rate {majority:.3f})"
    return text


def benefit_warning(with_acc: float, without_acc: float, what: str = "teacher", teacher: bool = True) -> str | None:
    """`benefit_line` when the thought-image benefit is near zero (the model does not use its thought
    images), else None."""
    return benefit_line(with_acc, without_acc, what, teacher) if with_acc - without_acc < BENEFIT_NEAR_ZERO else None


# -- teacher latents ----------------------------------------------------------------------------------
@dataclass
class TeacherStats:
    latents: torch.Tensor  # (N, K, H) float32
    norms: torch.Tensor  # (N, K)
    within: torch.Tensor  # (K, K): cosine between latent positions of one record, mean over records
    across: torch.Tensor  # (K,): mean cosine between different records at the same position

    @property
    def within_mean(self) -> float:
        k = self.within.shape[0]
        off = ~torch.eye(k, dtype=torch.bool)
        return self.within[off].mean().item() if k > 1 else float("nan")

    @property
    def across_mean(self) -> float:
        return self.across.mean().item()

    def summary(self) -> str:
        n, k, h = self.latents.shape
        rows = [[j + 1, self.norms[:, j].mean().item(), self.norms[:, j].std().item() if n > 1 else None,
                 self.across[j].item()] for j in range(k)]
        text = table(["position", "norm (mean)", "norm (std)", "cos across records"], rows)
        warning = collapse_warning(self.latents)
        return (f"{n} records x {k} latents x {h} dims\n{text}\n"
                f"mean cosine between positions of one record: {self.within_mean:.3f}; "
                f"between records at one position: {self.across_mean:.3f}" + (f"\n{warning}" if warning else ""))


def _normed(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def load_teachers(teacher_dir: str | Path, records: Sequence[Record], num_latents: int | None = None) -> torch.Tensor:
    """(N, K, H) teacher latents of the records (checked against each record by `read_teacher`)."""
    lat = [read_teacher(teacher_file(teacher_dir, r.idx), r, num_latents=num_latents) for r in records]
    return torch.stack([t[:num_latents] if num_latents else t for t in lat]).float()


def cosine_across(lat: torch.Tensor) -> torch.Tensor:
    """(N, K, H) -> (K,): mean cosine between different records' latents at each position (near 1: collapsed)."""
    x = _normed(lat)
    n = x.shape[0]
    if n < 2:
        return torch.full((x.shape[1],), float("nan"))
    sims = torch.einsum("nkh,mkh->knm", x, x)  # (K, N, N)
    return sims[:, ~torch.eye(n, dtype=torch.bool)].mean(-1)


def teacher_stats(teacher_dir: str | Path, records: Sequence[Record], num_latents: int | None = None) -> TeacherStats:
    lat = load_teachers(teacher_dir, records, num_latents)
    x = _normed(lat)  # (N, K, H)
    within = torch.einsum("nkh,njh->nkj", x, x).mean(0)
    return TeacherStats(lat, lat.norm(dim=-1), within, cosine_across(lat))


@torch.no_grad()
def latent_outputs(model, processor, records: Sequence[Record], num_latents: int, thought_images: bool = False,
                   batch_size: int = 16, feed: str = "continuous", visibility: str = "all",
                   visual_cot: bool = False) -> torch.Tensor:
    """(N, K, H) float32 outputs of the latent slots, computed as in training and generation (with thought images:
    the mask of the teacher precompute, `visibility` and `visual_cot` as the model was trained)."""
    collate = Collator(processor, model.config, num_latents, thought_images=thought_images, visibility=visibility,
                       visual_cot=visual_cot and thought_images)
    return torch.cat([_run(model, to_device(collate(chunk), model.device), feed=feed)[1].float().cpu()
                      for _, chunk in _batches(records, batch_size)])


# -- latent-teacher cosine for several K --------------------------------------------------------------
@dataclass
class CosineVsK:
    own: dict[int, list[float]]  # K -> mean cosine of each latent position to the record's own teacher
    other: dict[int, list[float]]  # K -> the same against another record's teacher (the collapse baseline)

    def summary(self) -> str:
        rows = [[k, sum(v) / len(v), sum(self.other[k]) / len(v)] for k, v in sorted(self.own.items())]
        text = table(["K", "cos to own teacher", "cos to another record's teacher"], rows)
        if all(own - other < SAME_AS_OTHER for _, own, other in rows):
            text += ("\nWARNING: the latents match another record's teacher as well as their own (difference below "
                     f"{SAME_AS_OTHER}): the cosine measures a direction shared by every record, not this record's "
                     "content")
        return text


@torch.no_grad()
def cosine_vs_k(model, processor, records: Sequence[Record], ks: Sequence[int], teacher_dir: str | Path,
                thought_images: bool = False, batch_size: int = 16) -> CosineVsK:
    """Latents computed as in training/inference for each K, compared with the teacher's first K.

    thought_images=False is the student setting (stage3, inference); True the teacher setting. The
    "other" numbers compare with the next record's teacher: a latent that only matches the average
    teacher (collapse) scores the same against both.
    """
    if len(records) < 2:
        raise ValueError("cosine_vs_k needs at least 2 records (one is compared with another's teacher)")
    teachers = load_teachers(teacher_dir, records, max(ks))
    own: dict[int, list[float]] = {}
    other: dict[int, list[float]] = {}
    for k in ks:
        lat = latent_outputs(model, processor, records, k, thought_images, batch_size)
        t = teachers[:, :k]
        own[k] = per_position_cosine(lat, t).mean(0).tolist()
        other[k] = per_position_cosine(lat, t.roll(1, 0)).mean(0).tolist()
    return CosineVsK(own, other)


# -- accuracy and the causal-use check ----------------------------------------------------------------
@dataclass
class AccuracyGrid:
    accuracy: dict[str, dict[int, float]]  # name -> K -> accuracy
    constant: dict[str, dict[int, str | None]]  # name -> K -> the one answer given to every record, or None

    def summary(self, majority: float | None = None) -> str:
        return grid_table(self.accuracy, majority, self.constant)


def accuracy_grid(model_dirs: dict[str, str | Path], records: Sequence[Record], ks: Sequence[int],
                  load: Callable, thought_images: bool = False, **kwargs) -> AccuracyGrid:
    """Accuracy and constant answers per K of each model folder (loaded one at a time with `load(path)`)."""
    acc, const = {}, {}
    for name, path in model_dirs.items():
        model, processor = load(path)
        res = evaluate(model, processor, records, ks, thought_images=thought_images, progress=False, **kwargs)
        acc[name] = {k: res["accuracy"][k] for k in ks}
        const[name] = {k: res.get("constant", {}).get(k) for k in ks}
        del model
    return AccuracyGrid(acc, const)


def grid_table(grid: dict[str, dict[int, float]], baseline: float | None = None,
               constant: dict[str, dict[int, str | None]] | None = None) -> str:
    """Accuracy per model and K; a constant predictor's cell says so ('"1" for all') and a warning follows."""
    ks = sorted({k for row in grid.values() for k in row})
    constant = constant or {}

    def cell(name: str, k: int) -> str | float | None:
        c = constant.get(name, {}).get(k)
        return f'{grid[name][k]:.3f} ("{c}" for all)' if c is not None else grid[name].get(k)

    rows = [[name, *[cell(name, k) for k in ks]] for name in grid]
    lines = [table(["model", *[f"K={k}" for k in ks]], rows)]
    if baseline is not None:
        lines.append(f"majority-answer baseline: {baseline:.3f}")
    for name, per_k in constant.items():
        answers = sorted({c for c in per_k.values() if c is not None})
        if answers:
            at = ", ".join(str(k) for k, c in sorted(per_k.items()) if c is not None)
            rate = f"; the majority-answer rate is {baseline:.3f}" if baseline is not None else ""
            lines.append(f"WARNING: {name} answers " + " / ".join(f'"{a}"' for a in answers)
                         + f" for every record at K={at} (a constant predictor{rate}): those accuracies are the "
                         "answer's frequency, not evidence about the latents")
    if baseline is not None and constant and all(v <= baseline + NEAR_MAJORITY for row in grid.values()
                                                  for v in row.values()):
        lines.append("WARNING: no model beats the majority-answer rate at any K: this run learnt nothing to compare")
    return "\n".join(lines)


@torch.no_grad()
def latent_inputs(model, processor, records: Sequence[Record], num_latents: int, thought_images: bool = False,
                  batch_size: int = 16, feed: str = "continuous", visibility: str = "all") -> torch.Tensor:
    """(N, K, H): what each record feeds its own latent slots: [h(<abs_vis_token>), out_1 .. out_{K-1}]
    (with feed="pause": the <abs_vis_token_pad> embedding at every slot).

    The same recurrence as generation (`latent_hidden_states` on the collator's batch).
    """
    collate = Collator(processor, model.config, num_latents, thought_images=thought_images, visibility=visibility)
    out = []
    for _, chunk in _batches(records, batch_size):
        b = to_device(collate(chunk), model.device)
        if feed == "pause":
            out.append(model.get_input_embeddings()(b["input_ids"][:, b["latent_start"]:][:, :num_latents]).cpu())
            continue
        hidden, lat = _run(model, b)
        s = b["latent_start"]
        out.append(torch.cat([hidden[:, s - 1:s], lat[:, :-1]], 1).cpu())
    return torch.cat(out)


CONDITIONS = ("normal", "zero", "shuffle", "mean", "noise", "pad embedding")


def derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) that moves every element (n >= 2)."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    while True:
        perm = torch.randperm(n, generator=gen)
        if not (perm == torch.arange(n)).any():
            return perm


def intervene(own: torch.Tensor, condition: str, seed: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor | None:
    """The latent inputs (N, K, H) that replace each record's own in one causal-use condition.

    normal: None (the model's own recurrence); zero: zeros; shuffle: another record's latents (every record
    gets someone else's); mean: the mean latent over the records, per position; noise: Gaussian noise with the
    norm of the latent it replaces; pad embedding: the <abs_vis_token_pad> embedding `pad` (H,), what a pause
    model sees.
    """
    gen = torch.Generator().manual_seed(seed)
    own = own.float()
    if condition == "normal":
        return None
    if condition == "zero":
        return torch.zeros_like(own)
    if condition == "shuffle":
        return own[derangement(own.shape[0], gen)]
    if condition == "mean":
        return own.mean(0, keepdim=True).expand_as(own).clone()
    if condition == "noise":
        noise = torch.randn(own.shape, generator=gen)
        return noise / noise.norm(dim=-1, keepdim=True) * own.norm(dim=-1, keepdim=True)
    if condition == "pad embedding":
        if pad is None:
            raise ValueError("the pad-embedding condition needs the embedding")
        return pad.float().expand_as(own).clone()
    raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")


@dataclass
class CausalUse:
    k: int
    accuracy: dict[str, float]  # condition -> accuracy
    changed: dict[str, float]  # replaced condition -> share of answers that differ from the normal answer
    answers: dict[str, list[str]]
    majority: float | None = None  # the majority-answer rate of the records
    collapse: str | None = None  # `collapse_warning` of the model's own latent inputs

    def warnings(self) -> list[str]:
        """Why the table may show nothing: a constant normal answer, collapsed latent inputs."""
        out = []
        normal = self.answers.get("normal")
        const = constant_warning(normal, self.majority, f"with its own latents (K={self.k}) the model") \
            if normal else None
        if const:
            out.append(const + '. "answers changed 0.000" then only says that a constant answer stays constant; '
                       "it does not show that a model which answers the question ignores its latents")
        if self.collapse:
            out.append(self.collapse + " (shuffle and mean then feed nearly the same vectors)")
        if not out and self.changed and all(v == 0 for v in self.changed.values()):
            out.append("no answer changed under any replacement: the answers do not depend on the latent inputs")
        return out

    def summary(self) -> str:
        rows = [[c, accuracy_cell(self.accuracy[c], self.answers[c], self.majority), self.changed.get(c)]
                for c in self.accuracy]
        return "\n".join([table(["latent inputs", "accuracy", "answers changed"], rows), *self.warnings()])


@torch.no_grad()
def causal_use(model, processor, records: Sequence[Record], num_latents: int, batch_size: int = 16,
               max_new_tokens: int = 8,
               conditions: Sequence[str] = CONDITIONS, seed: int = 0, feed: str = "continuous") -> CausalUse:
    """Answer accuracy when the latent inputs are the model's own (normal) or replaced (see `intervene`).

    Inference setting: no thought images. If the answers of a model that answers the question never change,
    the answer does not use the latents; a constant predictor's answers never change either (`summary` says so).
    """
    if num_latents < 1:
        raise ValueError("the causal-use check needs K >= 1 latent slots")
    if len(records) < 2:
        raise ValueError("the causal-use check needs at least 2 records (one feeds another's latents)")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    own = latent_inputs(model, processor, records, num_latents, batch_size=batch_size, feed=feed)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<abs_vis_token_pad>")
    pad = model.get_input_embeddings().weight[pad_id].detach().float().cpu()
    answers: dict[str, list[str]] = {}
    acc: dict[str, float] = {}
    for cond in conditions:
        feeds = intervene(own, cond, seed, pad)
        gens = []
        for start, chunk in _batches(records, batch_size):
            feed_in = feeds[start:start + len(chunk)].to(model.device, model.dtype) if feeds is not None else None
            gens += generate_batch(model, processor, chunk, num_latents, max_new_tokens=max_new_tokens,
                                   latent_inputs=feed_in, feed=feed)
        answers[cond] = [g.answer for g in gens]
        acc[cond] = accuracy(gens, records)
    base = answers.get("normal")
    changed = {c: (sum(a != b for a, b in zip(ans, base)) / len(ans) if base else float("nan"))
               for c, ans in answers.items() if c != "normal"}  # the normal answers are the reference
    return CausalUse(num_latents, acc, changed, answers, majority_rate(records), collapse_warning(own))
