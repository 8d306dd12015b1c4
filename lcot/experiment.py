"""`python -m lcot.experiment`: does latent visual reasoning work? The whole matrix, N seeds, one command.

    python -m lcot.experiment --name hops --task hops --seeds 3 --gpus 0
    python -m lcot.experiment --name mine --train_jsonl train.jsonl --eval_jsonl test.jsonl \\
        --difficulty_field hops --state_field states --model tiny

Per seed, from a model trained from scratch (`--model tiny` or `8m`, built offline with the seed) or a
local checkpoint, every row gets the same data and the same optimizer-step budget after one shared
warm-up (--stage vcot: question + thought images, the answer sees them: visual CoT). Then, per row,
stage2 (thought images reach the answer only through the latents) and stage3 (no thought images, K ~
U{1..Kmax}, aligned to the teacher's first K latents). Two protocols (`--protocol`):

    stage2-teacher   stage2 without alignment first; the teacher is precomputed from that stage2 model
    warmup-teacher   the seed's recipe with the warm-up as its stage1: the teacher is precomputed from the
                     warm-up model, stage2 and stage3 are both aligned to it

Rows: stage3 (the main recipe: --align, --latent_grad), align0 (no alignment), mse / cosine (other
alignments), grad (the other --latent_grad), pause (K slots fed one learned embedding, nothing fed
back), nolatent (--stage stage1 --question_images --latent_size 0 for stage2 + stage3 steps), curriculum
(the main row's stage2, then stage3 with --latent_curriculum: K's bound grows 1..Kmax in equal phases, after
Coconut's stages), forcing (the main row's stage2, then stage3 with --teacher_forcing: slot j fed the teacher's
latent j-1 with a probability annealed to 0), states (the main row's stage2, then stage3 with
--state_weight 1: latent j also learns the first token of the state after step j, from --state_field). Rows
whose stage2 would be identical share it. Every training job gets --thought_visibility; the warm-up and stage2
train to a criterion (--criterion_every), their step counts then being caps.

A seed whose warm-up or teacher does not read its thought images (benefit below --min_teacher_benefit) is
reported as a failed protocol at that stage, and its rows are left out of the means.

Every model is measured on the eval JSONL (`measure` below): the visual-CoT upper bound (warm-up model,
answer sees the thought images), stage2 with and without thought images (the thought-image benefit),
stage3 at K = 1..Kmax, the causal use of its latents (zeroed, shuffled across records, mean latent,
Gaussian noise of the same norm), every row per difficulty, and a linear probe from latent j to the state
after step j (`--state_field`) of the teacher's and stage3's latents.

Every job is a subprocess (its log in RUN/logs/); jobs run in parallel (`--procs`), round-robin over
`--gpus`, in dependency order. A finished job leaves a marker in RUN/done/, so running the same command
again skips it (resume after a kill); training jobs also resume from their last checkpoint. The results
go to RESULTS/<name>/: results.json, table.md (mean ± std over seeds, per difficulty, the gap recovered
= (stage3 - nolatent) / (visual CoT - nolatent)) and figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from lcot import config
from lcot.config import option
from lcot.console import quiet_libraries
from lcot.errors import LcotInputError, check_counts, check_output, cli_errors
from lcot.io import write_json

ROWS = ("align0", "mse", "cosine", "grad", "pause", "nolatent", "curriculum", "forcing", "states")
DEFAULT_ROWS = ROWS[:-3]  # the recipes are opt-in (--rows), so earlier runs resume as they were
RECIPES = ("stage3", "curriculum", "forcing", "states")  # the rows whose model is a stage3 on the main stage2
RECIPE_NAMES = {"stage3": "stage3", "curriculum": "curriculum stage3", "forcing": "teacher-forced stage3",
                "states": "state-supervised stage3"}
TEACHER_READS = 0.1  # default --min_teacher_benefit: a seed whose teacher gains less failed the protocol
PROTOCOLS = ("stage2-teacher", "warmup-teacher")
CAUSAL = ("zero", "shuffle", "mean", "noise")
COLLAPSE_COS = 0.99  # mean cosine across records above this: the latents do not depend on the record


@dataclass
class Plan:
    """Everything one experiment depends on; saved in results.json."""

    name: str
    train_jsonl: str
    eval_jsonl: str
    difficulty_field: str | None
    state_field: str | None
    model: str  # "tiny", "8m" (built from scratch per seed) or a local checkpoint folder
    seeds: list[int]
    num_latents: int
    warmup_steps: int
    stage2_steps: int
    stage3_steps: int
    bsz: int
    lr: float
    lr_scheduler: str
    latent_grad: str
    rows: list[str]
    protocol: str
    align: str
    eval_records: int
    probe_records: int
    bf16: bool = False
    extra: list[str] = field(default_factory=list)  # more lcot.main flags for every training job
    thought_visibility: str = "all"
    teacher_forcing: float = 0.5  # the forcing row's initial probability
    min_teacher_benefit: float = TEACHER_READS
    criterion_every: int = 0  # the warm-up and stage2 stop at their criterion (checked every N steps; 0: off)


@dataclass
class Job:
    name: str  # "s0/stage2"
    argv: list[str]  # after `python -m`
    deps: list[str]


# -- the job graph -------------------------------------------------------------------------------------------
# Every job is a process of its own that trains a small model for a few thousand steps: compiling its step there
# (--compile_step auto on a GPU) would cost each of them its compile time, and the README's results were measured
# with the eager step. `--extra "--compile_step on"` still turns it on for the training jobs.
EAGER_STEP = ("--compile_step", "off")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # after the 3% warm-up


def jobs_for_seed(plan: Plan, seed: int, run: Path) -> list[Job]:
    """The job graph of one seed (see the module docstring): warm-up, then one stage2 -> stage3 chain per row.

    Rows whose stage2 would be identical share it (and its teacher).
    """
    s, d = f"s{seed}", run / f"s{seed}"
    k, grad, align = plan.num_latents, plan.latent_grad, plan.align
    other = "full" if grad == "truncated" else "truncated"
    common = ["--train_jsonl", plan.train_jsonl, "--bsz", str(plan.bsz), "--grad_accum_steps", "1",
              "--learning_rate", str(plan.lr), "--lr_scheduler_type", SCHEDULES[plan.lr_scheduler], "--seed", str(seed),
              "--logging_steps", "50", "--save_steps", "1000", "--save_total_limit", "1",
              "--resume_from_checkpoint", "--preprocess", "--latent_size", str(k), *EAGER_STEP,
              "--thought_visibility", plan.thought_visibility, *plan.extra,
              *(["--bf16"] if plan.bf16 else [])]
    jobs: list[Job] = []

    def train(name: str, stage: str, src: str, steps: int, flags: list[str], deps: list[str]) -> str:
        model = _base(plan, seed, run) if src == "base" else str(d / src)
        jobs.append(Job(f"{s}/{name}", ["lcot.main", "--stage", stage, "--model_name_or_path", model, "--output_dir",
                                        str(d / name), "--max_steps", str(steps), *common, *flags], deps))
        return f"{s}/{name}"

    def teacher(name: str, src: str) -> str:
        jobs.append(Job(f"{s}/{name}", ["lcot.precompute_teacher_latents", "--model_name_or_path", str(d / src),
                                        "--output_dir", str(d / name), "--train_jsonl", plan.train_jsonl,
                                        "--k_max", str(k), "--bsz", "64", *EAGER_STEP,
                                        *(["--bf16"] if plan.bf16 else [])],
                        [f"{s}/{src}"]))
        return f"{s}/{name}"

    lines = sum(1 for line in Path(plan.train_jsonl).read_text().splitlines() if line.strip())
    held = str(max(1, min(100, lines // 5)))  # held out for the check: 100, or a fifth of a small JSONL
    criterion = ["--criterion_every", str(plan.criterion_every), "--criterion_records", held] \
        if plan.criterion_every else []
    warm = train("warmup", "vcot", "base", plan.warmup_steps, criterion, [])
    warm_teacher = teacher("teacher", "warmup") if plan.protocol == "warmup-teacher" else None
    stage2s: dict[tuple, tuple[str, str | None]] = {}  # stage2 flags -> (stage2 folder, its teacher folder)

    def chain(row: str, flags: list[str], row_align: str, weight: str = "1", stage3_flags: tuple = ()) -> None:
        """stage2 -> (teacher) -> stage3 of one row; `flags` go to both stages, `stage3_flags` to stage3."""
        aligned = ["--align", row_align, "--align_weight", weight]
        if plan.protocol == "warmup-teacher":  # the seed's recipe, the warm-up as its stage1
            key = (*flags, *aligned)
            t = "teacher"
            s2_flags = [*flags, *aligned, *(["--teacher_latent_dir", str(d / t)] if weight != "0" else [])]
            deps2 = [warm, *([warm_teacher] if weight != "0" else [])]
        else:  # stage2 without alignment first, the teacher taken from it
            key = tuple(flags)
            s2_flags, deps2, t = [*flags, "--align_weight", "0"], [warm], None
        if key not in stage2s:
            name2 = "stage2" if not stage2s else f"{row}_stage2"
            train(name2, "stage2", "warmup", plan.stage2_steps, [*s2_flags, *criterion], deps2)
            if t is None:
                t = "teacher" if name2 == "stage2" else f"{row}_teacher"
                teacher(t, name2)
            stage2s[key] = (name2, t)
        name2, t = stage2s[key]
        uses = weight != "0"
        train(row, "stage3", name2, plan.stage3_steps,
              [*flags, *stage3_flags, *aligned, *(["--teacher_latent_dir", str(d / t)] if uses else [])],
              [f"{s}/{name2}", *([f"{s}/{t}"] if uses else [])])

    chain("stage3", ["--latent_grad", grad], align)
    if "align0" in plan.rows:
        chain("align0", ["--latent_grad", grad], align, weight="0")
    if "mse" in plan.rows and align != "mse":
        chain("mse", ["--latent_grad", grad], "mse")
    if "cosine" in plan.rows and align != "cosine":
        chain("cosine", ["--latent_grad", grad], "cosine")
    if "grad" in plan.rows:
        chain("grad", ["--latent_grad", other], align)
    if "pause" in plan.rows:
        chain("pause", ["--latent_grad", grad, "--latent_feed", "pause"], align)
    if "curriculum" in plan.rows:  # the main row's stage2, a curriculum over K in stage3
        chain("curriculum", ["--latent_grad", grad], align, stage3_flags=("--latent_curriculum",))
    if "forcing" in plan.rows:  # the main row's stage2; stage3 fed the teacher's latents (scheduled sampling)
        chain("forcing", ["--latent_grad", grad], align, stage3_flags=(
            "--teacher_forcing", str(plan.teacher_forcing), "--latent_grad", "truncated"))
    if "states" in plan.rows and plan.state_field:  # per-step supervision of each latent slot
        chain("states", ["--latent_grad", grad], align, stage3_flags=(
            "--state_field", plan.state_field, "--state_weight", "1"))
    if "nolatent" in plan.rows:
        train("nolatent", "stage1", "warmup", plan.stage2_steps + plan.stage3_steps,
              ["--question_images", "--latent_size", "0"], [warm])
    return jobs + measure_jobs(plan, seed, run, [j.name for j in jobs])


def measure_jobs(plan: Plan, seed: int, run: Path, trained: list[str]) -> list[Job]:
    """One `measure` job per trained model; what it measures depends on what the model is."""
    s, d, k = f"s{seed}", run / f"s{seed}", plan.num_latents
    data = ["--train_jsonl", plan.train_jsonl, "--eval_jsonl", plan.eval_jsonl, "--limit", str(plan.eval_records),
            *(["--difficulty_field", plan.difficulty_field] if plan.difficulty_field else []),
            *(["--bf16"] if plan.bf16 else [])]
    probe = ["--probe_field", plan.state_field, "--probe_records", str(plan.probe_records)] if plan.state_field else []
    out = []
    for job in trained:
        model = job.split("/", 1)[1]
        if "teacher" in model:
            continue
        if model == "warmup":
            flags = ["--ks", str(k), "--thought_images", "--visual_cot",
                     *(probe if plan.protocol == "warmup-teacher" else [])]
        elif model.endswith("stage2"):
            flags = ["--ks", str(k), "--thought_images", *(probe if model == "stage2" else [])]
        elif model in RECIPES:
            flags = ["--ks", *map(str, range(1, k + 1)), "--causal", *probe]
        elif model == "nolatent":
            flags = ["--ks", "0"]
        else:
            flags = ["--ks", str(k)]
        out.append(Job(f"{s}/measure_{model}", ["lcot.experiment", "measure", "--model", str(d / model),
                                                "--out", str(d / "measure" / f"{model}.json"), *data, *flags], [job]))
    return out


def _base(plan: Plan, seed: int, run: Path) -> str:
    return str(run / f"base_s{seed}") if plan.model in ("tiny", "8m") else plan.model


# -- running jobs --------------------------------------------------------------------------------------------
def _env(gpu: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("LCOT_RUN_DIR", None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _slug(name: str) -> str:
    """A job's name as a file name (its done marker and log): s0/stage2 -> s0__stage2."""
    return name.replace("/", "__")


def run_jobs(jobs: list[Job], run: Path, procs: int, gpus: list[str], log=print) -> dict[str, str]:
    """Run the graph; returns {job: "done" | "skipped (done before)" | "failed (rc N)" | "not run (...)"}."""
    done_dir, log_dir = run / "done", run / "logs"
    done_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for j in jobs:
        if (done_dir / f"{_slug(j.name)}.json").is_file():
            state[j.name] = "skipped (done before)"
    names = {j.name for j in jobs}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    launched = 0
    t0 = time.time()
    while True:
        for name, (p, start, fh) in list(running.items()):
            rc = p.poll()
            if rc is None:
                continue
            fh.close()
            del running[name]
            wall = time.time() - start
            if rc == 0:
                state[name] = "done"
                marker = done_dir / f"{_slug(name)}.json"
                marker.write_text(json.dumps({"job": name, "wall_s": round(wall, 1)}) + "\n")
            else:
                state[name] = f"failed (rc {rc}, see {log_dir / (_slug(name) + '.log')})"
            log(f"[{time.time() - t0:7.0f}s] {name}: {state[name]} in {wall:.0f}s")
        finished = {n for n, v in state.items() if v.startswith(("done", "skipped"))}
        for j in jobs:
            if j.name in state or j.name in running:
                continue
            bad = [d for d in j.deps if d in names and state.get(d, "").startswith(("failed", "not run"))]
            if bad:
                state[j.name] = f"not run ({bad[0]} did not finish)"
                log(f"[{time.time() - t0:7.0f}s] {j.name}: {state[j.name]}")
                continue
            if len(running) < procs and all(d in finished or d not in names for d in j.deps):
                gpu = gpus[launched % len(gpus)] if gpus else None
                launched += 1
                log_dir.mkdir(parents=True, exist_ok=True)
                fh = open(log_dir / f"{_slug(j.name)}.log", "w")
                fh.write("$ python -m " + " ".join(j.argv) + "\n")
                fh.flush()
                p = subprocess.Popen([sys.executable, "-m", *j.argv], stdout=fh, stderr=subprocess.STDOUT,
                                     env=_env(gpu))
                running[j.name] = (p, time.time(), fh)
                log(f"[{time.time() - t0:7.0f}s] {j.name}: started" + (f" on GPU {gpu}" if gpu else ""))
        if not running and all(j.name in state for j in jobs):
            return state
        time.sleep(0.5)


# -- measuring one model -------------------------------------------------------------------------------------
def check_measure(args) -> None:
    """`measure`'s flags, before the model loads: the model folder, each K at most the trained one, counts."""
    from lcot.pipeline.generate import choose_ks
    from lcot.pipeline.load import check_model_folder

    check_model_folder(args.model)
    choose_ks(args.model, args.ks, "--ks")
    check_output("--out", args.out, folder=False)
    see = f"see `{PROG} measure --help`"
    check_counts([("--batch_size", args.batch_size, 1, see), ("--limit", args.limit, 0, see),
                  ("--probe_records", args.probe_records, 1, see)])


def measure(args) -> dict:
    """Accuracy per K (with and without thought images), per difficulty, causal use and the probe; as JSON."""
    from lcot.lab.analysis import causal_use, cosine_across, latent_outputs
    from lcot.lab.probe import probe_grid
    from lcot.pipeline.data import read_records
    from lcot.pipeline.evaluate import evaluate, majority_rate
    from lcot.pipeline.generate import trained_feed, trained_visibility
    from lcot.pipeline.load import load
    from lcot.pipeline.runs import read_lcot_config

    check_measure(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load(args.model, torch.bfloat16 if args.bf16 else torch.float32, device)
    model.eval()
    feed = trained_feed(args.model)
    test = read_records(args.eval_jsonl, need_thought_images=args.thought_images)[: args.limit or None]
    common = dict(batch_size=args.batch_size, max_new_tokens=8, progress=False, feed=feed,
                  difficulty=args.difficulty_field, visibility=trained_visibility(args.model))
    out: dict = {"model": args.model, "stage": read_lcot_config(args.model).get("stage"), "feed": feed,
                 "criterion": read_lcot_config(args.model).get("criterion"),
                 "n": len(test), "majority": majority_rate(test), "settings": {}}
    settings = {"without": dict(thought_images=False)}
    if args.thought_images:
        settings["with"] = dict(thought_images=True, visual_cot=args.visual_cot)
    for name, kw in settings.items():
        res = evaluate(model, processor, test, args.ks, **kw, **common)
        out["settings"][name] = {str(k): {"accuracy": res["accuracy"][k], "constant": res["constant"][k],
                                          "by_difficulty": {str(d): v for d, v in
                                                            res.get("by_difficulty", {}).get(k, {}).items()}}
                                 for k in args.ks}
    kmax = max(args.ks)
    if args.causal and kmax:
        use = causal_use(model, processor, test, kmax, batch_size=args.batch_size, conditions=("normal", *CAUSAL),
                         feed=feed)
        out["causal"] = {c: {"accuracy": use.accuracy[c], "changed": use.changed.get(c),
                             "by_difficulty": _by_difficulty(use.answers[c], test, args.difficulty_field)}
                         for c in use.accuracy}
    if args.probe_field and kmax:
        train = read_records(args.train_jsonl)[: args.probe_records]
        thought = args.thought_images  # the teacher is probed where its latents come from: with thought images
        mask = dict(visibility=trained_visibility(args.model), visual_cot=out["stage"] == "vcot")  # the teacher's
        lat_train = latent_outputs(model, processor, train, kmax, thought, args.batch_size, feed, **mask)
        lat_test = latent_outputs(model, processor, test, kmax, thought, args.batch_size, feed, **mask)
        grid = probe_grid(lat_train, [r.extra.get(args.probe_field, []) for r in train],
                          lat_test, [r.extra.get(args.probe_field, []) for r in test])
        out["probe"] = {**grid.to_json(), "thought_images": thought}
        out["latent_cos_across"] = cosine_across(lat_test).tolist()
    return out


def _by_difficulty(answers: list[str], records, field: str | None) -> dict:
    from lcot.pipeline.evaluate import by_group, normalise

    if not field:
        return {}
    correct = [normalise(a) == normalise(r.final_answer) for a, r in zip(answers, records)]
    return {str(d): v for d, v in by_group(correct, [r.extra.get(field) for r in records]).items()}


# -- aggregation over seeds ----------------------------------------------------------------------------------
def _rows(plan: Plan) -> list[tuple[str, str, str, int]]:
    """(row label, measured model, setting, K) of the results table, in order (rows never measured are
    left out later)."""
    k = plan.num_latents
    other = "full" if plan.latent_grad == "truncated" else "truncated"
    warm = plan.protocol == "warmup-teacher"
    ablations = {"align0": "--align_weight 0", "mse": "--align mse", "cosine": "--align cosine",
                 "grad": f"--latent_grad {other}", "pause": "pause control"}
    rows = [("no-latent SFT (K=0)", "nolatent", "without", 0),
            (f"pause control (K={k})", "pause", "without", k),
            *[(f"latent, stage3 (K={j})", "stage3", "without", j) for j in range(1, k + 1)],
            ("visual CoT: warm-up, answer sees thought images (upper bound"
             + ("; the teacher)" if warm else ")"), "warmup", "with", k),
            ("warm-up without thought images", "warmup", "without", k),
            ("stage2" + (" (aligned)" if warm else " (the teacher)") + ", thought images to latents only",
             "stage2", "with", k),
            ("stage2 without thought images", "stage2", "without", k)]
    rows += [(f"ablation: {label}", row, "without", k) for row, label in ablations.items() if row != "pause"]
    rows += [(f"stage2 of {label}, with thought images", f"{row}_stage2", "with", k)
             for row, label in ablations.items()]
    rows += [(f"recipe: stage3 with a curriculum over K (K={j})", "curriculum", "without", j) for j in range(1, k + 1)]
    rows += [(f"recipe: teacher-forced stage3 (K={j})", "forcing", "without", j) for j in range(1, k + 1)]
    rows += [(f"recipe: state-supervised stage3 (K={j})", "states", "without", j) for j in range(1, k + 1)]
    return rows


def protocol_failures(plan: Plan, seeds: dict) -> dict[str, str]:
    """{seed: why} for the seeds whose teacher does not read its thought images (benefit below the plan's
    min_teacher_benefit): the warm-up under warmup-teacher, stage2 under stage2-teacher; their downstream rows
    teach nothing."""
    stages = ["warmup"] if plan.protocol == "warmup-teacher" else ["warmup", "stage2"]
    names = {"warmup": "the warm-up", "stage2": "stage2 (the teacher)"}
    out = {}
    for seed, ms in seeds.items():
        for model in stages:
            settings = ms.get(model, {}).get("settings", {})
            if "with" not in settings:
                continue
            k = next(iter(settings["with"]))
            with_, without = settings["with"][k]["accuracy"], settings["without"][k]["accuracy"]
            if with_ - without < plan.min_teacher_benefit:
                steps = (ms[model].get("criterion") or {}).get("steps")
                out[str(seed)] = (f"protocol failed at {names[model]}: {with_:.3f} with thought images, "
                                  f"{without:.3f} without (majority {ms[model].get('majority', float('nan')):.3f})"
                                  + (f" after {steps} steps" if steps else ""))
                break
    return out


def steps_used(seeds: dict) -> dict:
    """{model: {seed: (steps run, step the criterion was met at or None)}} of the stages trained to a criterion."""
    out: dict = {}
    for seed, ms in seeds.items():
        for model, m in ms.items():
            if m.get("criterion"):
                out.setdefault(model, {})[str(seed)] = [m["criterion"]["steps"], m["criterion"]["met_at"]]
    return out


def _stats(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std, "n": len(vals)}


def _gap(top: float | None, bottom: float | None, value: float | None) -> float | None:
    if top is None or bottom is None or value is None or top - bottom < 0.02:
        return None  # no gap to recover
    return (value - bottom) / (top - bottom)


def aggregate(plan: Plan, run: Path) -> dict:
    """Per-seed measurements -> rows with mean ± std, per difficulty, gap recovered, probe and warnings."""
    seeds = {seed: {p.stem: json.loads(p.read_text()) for p in sorted((run / f"s{seed}" / "measure").glob("*.json"))}
             for seed in plan.seeds}
    failed, every = protocol_failures(plan, seeds), seeds
    seeds = {seed: ms for seed, ms in seeds.items() if str(seed) not in failed}  # not averaged in
    rows = []
    for label, model, setting, k in _rows(plan):
        per_seed = {}
        for seed, ms in seeds.items():
            r = ms.get(model, {}).get("settings", {}).get(setting, {}).get(str(k))
            if r is not None:
                per_seed[seed] = r
        if not per_seed:
            continue
        diffs = sorted({d for r in per_seed.values() for d in r["by_difficulty"]}, key=_num)
        consts = [r["constant"] for r in per_seed.values() if r["constant"] is not None]
        rows.append({"row": label, "model": model, "setting": setting, "k": k,
                     "overall": _stats([r["accuracy"] for r in per_seed.values()]),
                     "by_difficulty": {d: _stats([r["by_difficulty"].get(d) for r in per_seed.values()])
                                       for d in diffs},
                     "per_seed": {str(s): r["accuracy"] for s, r in per_seed.items()},
                     "constant": consts, "seeds": len(per_seed)})
    causal_rows = []  # causal use of the latents at Kmax (stage3, and the other recipes)
    for model, cond in ((m, c) for m in RECIPES for c in CAUSAL):
        per = {seed: ms[model]["causal"][cond] for seed, ms in seeds.items() if "causal" in ms.get(model, {})}
        if per:
            diffs = sorted({d for r in per.values() for d in r["by_difficulty"]}, key=_num)
            name = RECIPE_NAMES[model]
            causal_rows.append({"row": f"{name} (K={plan.num_latents}), latents {_CAUSAL_LABEL[cond]}",
                                "model": model, "condition": cond,
                                "overall": _stats([r["accuracy"] for r in per.values()]),
                                "changed": _stats([r["changed"] for r in per.values()]),
                                "by_difficulty": {d: _stats([r["by_difficulty"].get(d) for r in per.values()])
                                                  for d in diffs},
                                "per_seed": {str(s): r["accuracy"] for s, r in per.items()}, "constant": []})
    majority = [m["majority"] for ms in every.values() for m in ms.values() if "majority" in m]
    recipes = {f"gap_recovered_{m}": _gaps(plan, seeds, m) for m in RECIPES[1:]
               if any(m in ms for ms in seeds.values())}
    return {"rows": rows, "causal": causal_rows, "gap_recovered": _gaps(plan, seeds), **recipes,
            "failed": failed, "steps_used": steps_used(every),
            "teacher_benefit": _benefits(every), "probe": _probes(seeds), "collapse": _collapse(seeds),
            "majority": max(majority) if majority else float("nan"),
            "eval_n": max((m.get("n", 0) for ms in every.values() for m in ms.values()), default=0)}


_CAUSAL_LABEL = {"zero": "zeroed", "shuffle": "shuffled across records", "mean": "replaced by the mean latent",
                 "noise": "replaced by Gaussian noise of the same norm"}


def _num(x: str):
    try:
        return (0, float(x))
    except ValueError:
        return (1, x)


def _acc(ms: dict, model: str, setting: str, k: int, diff: str | None = None) -> float | None:
    r = ms.get(model, {}).get("settings", {}).get(setting, {}).get(str(k))
    if r is None:
        return None
    return r["accuracy"] if diff is None else r["by_difficulty"].get(diff)


def _gaps(plan: Plan, seeds: dict, model: str = "stage3") -> dict:
    """Gap recovered per seed: (model - nolatent) / (visual CoT - nolatent), overall and per difficulty."""
    k = plan.num_latents
    diffs = sorted({d for ms in seeds.values() for d in
                    ms.get("warmup", {}).get("settings", {}).get("with", {}).get(str(k), {}).get("by_difficulty", {})},
                   key=_num)
    out = {}
    for diff in [None, *diffs]:
        per = {str(seed): _gap(_acc(ms, "warmup", "with", k, diff), _acc(ms, "nolatent", "without", 0, diff),
                               _acc(ms, model, "without", k, diff)) for seed, ms in seeds.items()}
        out["overall" if diff is None else diff] = {**_stats(list(per.values())), "per_seed": per}
    return out


def _benefits(seeds: dict) -> dict:
    """Thought-image benefit (with - without) of every model measured both ways: the warm-up (in its visual-CoT
    setting), stage2 and the stage2 of other rows (thought images to the latents only)."""
    out = {}
    models = sorted({m for ms in seeds.values() for m, r in ms.items() if "with" in r.get("settings", {})})
    for model in models:
        per = {}
        for seed, ms in seeds.items():
            settings = ms.get(model, {}).get("settings", {})
            if "with" in settings:
                k = next(iter(settings["with"]))
                per[str(seed)] = settings["with"][k]["accuracy"] - settings["without"][k]["accuracy"]
        if per:
            out[model] = {**_stats(list(per.values())), "per_seed": per}
    return out


def _probes(seeds: dict) -> dict:
    out = {}
    for model in ("warmup", "stage2", *RECIPES):
        grids = [ms[model]["probe"] for ms in seeds.values() if "probe" in ms.get(model, {})]
        if not grids:
            continue
        acc = [[_stats([g["accuracy"][j][i] for g in grids]) for i in range(len(grids[0]["chance"]))]
               for j in range(len(grids[0]["accuracy"]))]
        chance = [_stats([g["chance"][i] for g in grids]) for i in range(len(grids[0]["chance"]))]
        out[model] = {"accuracy": acc, "chance": chance, "thought_images": grids[0]["thought_images"]}
    return out


def _collapse(seeds: dict) -> dict:
    out = {}
    for model in ("warmup", "stage2", *RECIPES):
        per = {str(s): sum(ms[model]["latent_cos_across"]) / len(ms[model]["latent_cos_across"])
               for s, ms in seeds.items() if "latent_cos_across" in ms.get(model, {})}
        if per:
            out[model] = {**_stats(list(per.values())), "per_seed": per}
    return out


# -- the table -----------------------------------------------------------------------------------------------
def _pm(st: dict) -> str:
    if st.get("mean") is None:
        return "-"
    return f"{st['mean']:.3f}" + (f" ± {st['std']:.3f}" if st.get("std") is not None else "")


def _notes(row: dict, seeds: int, majority: float) -> str:
    notes = []
    if row["constant"]:
        answers = sorted(set(row["constant"]))
        notes.append(f"constant predictor in {len(row['constant'])}/{seeds} seeds (answers "
                     + ", ".join(f'"{a}"' for a in answers) + " for every record)")
    m = row["overall"]["mean"]
    if m is not None and m <= majority + 0.02 and not row["constant"]:
        notes.append("at the majority-answer rate")
    return "; ".join(notes)


def table_md(plan: Plan, agg: dict, info: dict) -> str:
    diffs = sorted({d for r in agg["rows"] for d in r["by_difficulty"]}, key=_num)
    dname = plan.difficulty_field or "difficulty"
    head = ["row", "overall", *[f"{dname}={d}" for d in diffs], "notes"]
    lines = [f"# {plan.name}: does latent visual reasoning work?", "",
             f"{len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}); mean ± std over seeds of the exact-match "
             f"accuracy on {agg['eval_n']} eval records (majority-answer rate {agg['majority']:.3f}). "
             f"Model: {plan.model}; K = {plan.num_latents}; steps: warm-up {plan.warmup_steps}, then "
             f"{plan.stage2_steps + plan.stage3_steps} for every row (stage2 {plan.stage2_steps} + stage3 "
             f"{plan.stage3_steps}); batch {plan.bsz}, lr {plan.lr} ({plan.lr_scheduler}), --latent_grad "
             f"{plan.latent_grad}, --align {plan.align}; protocol {plan.protocol} (the teacher is the "
             f"{'warm-up' if plan.protocol == 'warmup-teacher' else 'stage2'} model). "
             f"Device: {info.get('device', '?')}; wall time {info.get('wall_s', 0) / 60:.1f} min.",
             ""]
    failures = [f"**Seed {seed}: {why}.** Its rows are not averaged into the table below."
                for seed, why in agg.get("failed", {}).items()]
    if len(failures) == len(plan.seeds):
        failures.insert(0, "**No seed passed the protocol: this run shows nothing about the latents.**")
    lines += [x for f in failures for x in (f, "")]
    for model, per in sorted(agg.get("steps_used", {}).items(), key=lambda kv: kv[0] != "warmup"):
        cap = plan.warmup_steps if model == "warmup" else plan.stage2_steps
        lines += [f"Steps used by {model} (trained to its criterion, cap {cap}): "
                  + ", ".join(f"seed {s} {n} ({'met' if met else 'not met'})" for s, (n, met) in sorted(per.items()))
                  + ".", ""]
    seeds = len(plan.seeds) - len(agg.get("failed", {}))
    rows = agg["rows"] + agg["causal"]
    if rows:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append("No rows: every seed failed the protocol, so there is nothing to average.")
    for r in rows:
        cells = [r["row"], _pm(r["overall"]), *[_pm(r["by_difficulty"].get(d, {})) for d in diffs],
                 _notes(r, seeds, agg["majority"])]
        lines.append("| " + " | ".join(cells) + " |")
    g = agg["gap_recovered"]
    lines += ["", "**Gap recovered** = (stage3 at K=Kmax − no-latent) / (visual CoT − no-latent): "
              + ", ".join(f"{'overall' if key == 'overall' else f'{dname}={key}'} {_pm(v)}" for key, v in g.items())
              + " (`-`: no gap to recover, the visual CoT is not above the no-latent baseline)."]
    for model in RECIPES[1:]:
        if f"gap_recovered_{model}" in agg:
            lines += ["", f"Gap recovered by the {RECIPE_NAMES[model]}: " + ", ".join(
                f"{'overall' if key == 'overall' else f'{dname}={key}'} {_pm(v)}"
                for key, v in agg[f"gap_recovered_{model}"].items()) + "."]
    teacher = "warmup" if plan.protocol == "warmup-teacher" else "stage2"
    for model, b in sorted(agg["teacher_benefit"].items(), key=lambda kv: kv[0] != teacher):
        line = f"Thought-image benefit of {model}{' (the teacher)' if model == teacher else ''} (with − without): " \
               f"{_pm(b)}"
        if b["mean"] is not None and b["mean"] < 0.05:
            line += (". **WARNING: near zero — the teacher does not use its thought images; aligning to it teaches "
                     "nothing it could not learn without them.**" if model == teacher else
                     ". **WARNING: near zero — this model does not read its thought images (through the latents).**")
        lines += ["", line]
    for model, c in agg["collapse"].items():
        line = f"Mean cosine between different records' latents ({model}): {_pm(c)}"
        if c["mean"] is not None and c["mean"] > COLLAPSE_COS:
            line += ". **WARNING: the latents have collapsed (they barely depend on the record).**"
        lines += ["", line]
    for model, pr in agg["probe"].items():
        steps = len(pr["chance"])
        seen = "with" if pr["thought_images"] else "without"
        lines += ["", f"Linear probe, {model} latents ({seen} thought images): test accuracy of predicting the state "
                  "after step i from latent j (ridge, fit on training latents).",
                  "", "| latent | " + " | ".join(f"state {i + 1}" for i in range(steps)) + " |",
                  "|" + "---|" * (steps + 1)]
        for j, row in enumerate(pr["accuracy"]):
            lines.append(f"| {j + 1} | " + " | ".join(_pm(v) for v in row) + " |")
        lines.append("| chance (majority) | " + " | ".join(_pm(v) for v in pr["chance"]) + " |")
    return "\n".join(lines) + "\n"


def figures(plan: Plan, agg: dict, out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image: aggregate again elsewhere with --aggregate_only
        print("lcot: matplotlib is not installed: no figures (run again with --aggregate_only where it is)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lcot.lab import plots

    made = []
    diffs = sorted({d for r in agg["rows"] for d in r["by_difficulty"]}, key=_num)
    k = plan.num_latents
    panels = {  # which rows each panel draws
        "the rows (stage3 at K=Kmax)": [r for r in agg["rows"] if r["setting"] == "without" and r["k"] in (0, k)
                                        and not r["model"].endswith("stage2") and r["model"] != "warmup"
                                        or r["model"] == "warmup" and r["setting"] == "with"],
        "stage2: thought images only through the latents": [r for r in agg["rows"] if r["model"].endswith("stage2")],
        "stage3: K and causal use of the latents": [r for r in agg["rows"] if r["model"] == "stage3"]
        + [r for r in agg["causal"] if r["model"] == "stage3"]}
    if diffs:
        fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), sharey=True)
        for ax, (title, rows) in zip(axes, panels.items()):
            colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20").colors
            for i, r in enumerate(rows):
                ys = [r["by_difficulty"].get(d, {}).get("mean") for d in diffs]
                es = [r["by_difficulty"].get(d, {}).get("std") or 0 for d in diffs]
                ax.errorbar(range(len(diffs)), [y if y is not None else float("nan") for y in ys], yerr=es,
                            label=r["row"], marker="o", capsize=3, color=colours[i % len(colours)],
                            ls="--" if r in agg["causal"] else "-")
            ax.axhline(agg["majority"], color="grey", ls=":", label="majority answer")
            ax.set_xticks(range(len(diffs)), diffs)
            ax.set_xlabel(plan.difficulty_field or "difficulty")
            ax.set_ylim(0, 1.02)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=6.5, loc="upper right")
        axes[0].set_ylabel(f"accuracy (mean ± std over {len(plan.seeds)} seeds)")
        fig.suptitle(f"{plan.name}: accuracy by difficulty", fontsize=11)
        made.append(plots.save(fig, out / "accuracy_by_difficulty.png"))
    if agg["probe"]:
        fig, axes = plt.subplots(1, len(agg["probe"]), figsize=(4.5 * len(agg["probe"]), 3.8), squeeze=False)
        for n, (ax, (model, pr)) in enumerate(zip(axes[0], agg["probe"].items())):
            grid = [[v["mean"] if v["mean"] is not None else float("nan") for v in row] for row in pr["accuracy"]]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
            for j, row in enumerate(grid):
                for i, v in enumerate(row):
                    ax.text(i, j, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if not math.isnan(v) and v < 0.6 else "black")
            ax.set_xticks(range(len(grid[0])), [f"state {i + 1}" for i in range(len(grid[0]))])
            ax.set_yticks(range(len(grid)), [f"latent {j + 1}" for j in range(len(grid))] if n == 0 else [])
            seen = "with" if pr["thought_images"] else "without"
            ax.set_title(f"probe: {model} latents ({seen} thought images)", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        made.append(plots.save(fig, out / "probe.png"))
    return made


# -- the command ---------------------------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    """The flags of `python -m lcot.experiment` (the Plan is what of them defines the results)."""

    name: str = option(help="results go to RESULTS_DIR/NAME, runs to RUN_DIR/NAME")
    task: str | None = option(None, "generate a bundled task (lcot.toy.synthetic --task hops or moves) instead of "
                              "--train_jsonl/--eval_jsonl", choices=("hops", "moves"))
    n: int = option(3000, "--task: records to generate (a fifth is the eval split)")
    max_hops: int = option(4, "--task: steps in 1..max_hops")
    grid_cols: int = option(4, "--task: grid columns")
    grid_rows: int = option(2, "--task: grid rows (columns x rows cells, at most 8)")
    train_jsonl: str | None = option(None, "training records (any JSONL in the format; thought images needed)")
    eval_jsonl: str | None = option(None, "evaluation records with ground truth")
    difficulty_field: str | None = option(None, "extra JSONL field to break accuracy down by (--task hops: hops)")
    state_field: str | None = option(None, "extra JSONL field with the state after each step, for the probe "
                                     "(--task hops: states)")
    model: str = option("tiny", "tiny or 8m (built from scratch with each seed), or a local checkpoint folder")
    seeds: int = option(3, "seeds 0..N-1")
    num_latents: int = option(4, "K (Kmax of stage3)", flag="latent_size")
    warmup_steps: int = option(3000, "optimizer steps of the visual-CoT warm-up (its cap with --criterion_every)")
    stage2_steps: int = option(1500, "optimizer steps of stage2 (its cap with --criterion_every)")
    stage3_steps: int = option(1500, "optimizer steps of stage3 (no-latent: stage2 + stage3)")
    bsz: int = option(16, "records per optimizer step")
    lr: float = option(1e-3, "learning rate")
    lr_scheduler: str = option("constant", "after a 3%% warm-up", choices=("linear", "cosine", "constant"))
    latent_grad: str = option("truncated", "the main recipe's gradient (the grad row uses the other one)",
                              choices=("truncated", "full"))
    protocol: str = option("stage2-teacher", "stage2-teacher: stage2 without alignment first, the teacher taken "
                           "from it; warmup-teacher: the seed's recipe with the visual-CoT warm-up as its stage1 "
                           "(teacher = warm-up, stage2 and stage3 aligned)", choices=PROTOCOLS)
    align: str = option("centered", "the main recipe's alignment", choices=("cosine", "mse", "centered"))
    rows: list[str] = option(list(DEFAULT_ROWS), "rows besides warm-up, stage2, teacher and stage3: align0 "
                             "(--align_weight 0), mse, cosine (the other alignments), grad (the other "
                             "--latent_grad), pause (the control), nolatent (K=0); the recipes only when named: "
                             "curriculum (--latent_curriculum), forcing (--teacher_forcing), states "
                             "(--state_weight 1, needs --state_field)", choices=ROWS)
    eval_records: int = option(0, "evaluate on the first N eval records (0: all)")
    probe_records: int = option(1000, "training records the probe is fit on")
    bf16: bool = option(False, "train and evaluate in bfloat16")
    gpus: str | None = option(None, "comma-separated GPU ids (None: all visible; none on a CPU)")
    procs: int = option(0, "jobs at once (0: 2 on a CPU, 6 per GPU)")
    run_dir: str = option("runs/experiments", "checkpoints, teachers, logs (ignored by git)")
    results_dir: str = option("results", "results.json, table.md, figures")
    thought_visibility: str = option("all", "which thought image each latent slot sees in every training job "
                                     "(lcot.main --thought_visibility)", choices=("all", "stepwise", "cumulative"))
    teacher_forcing: float = option(0.5, "the forcing row: stage3's initial probability of feeding slot j the "
                                    "teacher's latent j-1 (annealed to 0)")
    criterion_every: int = option(100, "the warm-up and stage2 check 100 held-out training records every N steps "
                                  "and stop once accuracy with thought images >= 0.9 and the benefit >= 0.3 "
                                  "(lcot.main --criterion_*); the step counts are then caps. 0: fixed step counts")
    min_teacher_benefit: float = option(TEACHER_READS, "a seed whose teacher's thought-image benefit (accuracy with "
                                        "minus without) is below this failed the protocol: its rows are reported "
                                        "apart, not averaged")
    extra: str = option("", "more lcot.main flags for every training job, in one quoted string")
    dry_run: bool = option(False, "print the jobs and exit")
    aggregate_only: bool = option(False, "run nothing: read RUN_DIR/NAME (its plan.json and measurements, e.g. "
                                  "copied from a GPU machine) and write the results again")
    verbose: bool = option(False, "the training jobs print everything transformers prints into their logs in "
                           "RUN_DIR/NAME/logs/ (without it: a header, a bar and about ten loss lines a job)",
                           aliases=("-v",))


@dataclass
class MeasureConfig:
    """The flags of `python -m lcot.experiment measure`: measure one trained model (a job of the experiment)."""

    model: str = option(help="the trained model folder")
    train_jsonl: str = option(help="training records (the probe is fit on them)")
    eval_jsonl: str = option(help="evaluation records with ground truth")
    out: str = option(help="JSON file to write")
    ks: list[int] = option(help="K values to measure")
    thought_images: bool = option(False, "also measure with thought images")
    visual_cot: bool = option(False, "with thought images, the answer sees them too")
    causal: bool = option(False, "causal use of the latents at the largest K")
    probe_field: str | None = option(None, "extra JSONL field with the states (the probe's targets)")
    probe_records: int = option(1000, "training records the probe is fit on")
    difficulty_field: str | None = option(None, "extra JSONL field to break accuracy down by")
    limit: int = option(0, "measure on the first N eval records (0: all)")
    batch_size: int = option(64, "records per generate call")
    bf16: bool = option(False, "evaluate in bfloat16")


PROG = "python -m lcot.experiment"


def parser() -> argparse.ArgumentParser:
    return config.parser(ExperimentConfig, PROG, __doc__)


def _renamed(saved: dict) -> dict:
    """A plan.json written before K's one name (latent_size -> num_latents), or before a field existed (its
    default then), reads as today's."""
    defaults = {f.name: f.default for f in fields(Plan) if f.default is not MISSING}
    return {**defaults, **{("num_latents" if k == "latent_size" else k): v for k, v in saved.items()}}


def check(args: ExperimentConfig) -> None:
    """Refuse flags that cannot work before anything is written or built (one line each, with a hint)."""
    check_output("--run_dir", args.run_dir)
    check_output("--results_dir", args.results_dir)
    least = {"--seeds": (args.seeds, 1), "--latent_size": (args.num_latents, 1), "--bsz": (args.bsz, 1),
             "--warmup_steps": (args.warmup_steps, 1), "--stage2_steps": (args.stage2_steps, 1),
             "--stage3_steps": (args.stage3_steps, 1), "--probe_records": (args.probe_records, 1),
             "--eval_records": (args.eval_records, 0), "--procs": (args.procs, 0)}
    if args.task:
        least.update({"--n": (args.n, 1), "--max_hops": (args.max_hops, 1)})
    check_counts((flag, value, low, f"see `{PROG} --help` for what it counts") for flag, (value, low) in least.items())
    if not args.lr > 0:
        raise LcotInputError("--lr", f"must be > 0, got {args.lr}", "e.g. --lr 1e-3")
    if args.model not in ("tiny", "8m") and not (Path(args.model) / "config.json").is_file():
        raise LcotInputError("--model", f"{args.model} is neither tiny, 8m nor a model folder (no config.json)",
                             "--model tiny or 8m builds a model from scratch per seed; else pass a local checkpoint")


def check_data(plan: Plan) -> None:
    """Read both JSONL files (bad records, an empty file, missing thought images stop here, not in a job)."""
    from lcot.pipeline.data import read_records

    read_records(plan.train_jsonl, need_thought_images=True)
    read_records(plan.eval_jsonl, need_thought_images=True)


def _plan(args) -> Plan:
    if args.task:
        from lcot.toy.synthetic import generate

        folder = Path(args.run_dir) / args.name / "data"
        try:
            data = generate(folder, n=args.n, seed=0, task=args.task, max_hops=args.max_hops, cols=args.grid_cols,
                            rows=args.grid_rows)
        except FileExistsError:
            raise LcotInputError(str(folder), f"holds a dataset made with other settings than --n {args.n} "
                                 f"--max_hops {args.max_hops} --grid_cols {args.grid_cols} --grid_rows "
                                 f"{args.grid_rows}",
                                 "use another --name, or delete the run folder to "
                                 "start over") from None
        except ValueError as err:  # e.g. --max_hops too large for the grid
            raise LcotInputError(f"--task {args.task}", str(err), "e.g. --max_hops 4") from None
        args.train_jsonl, args.eval_jsonl = str(data["train"]), str(data["test"])
        args.difficulty_field = args.difficulty_field or "hops"
        args.state_field = args.state_field or "states"
    if not (args.train_jsonl and args.eval_jsonl):
        raise LcotInputError("--train_jsonl", "give --task hops, or both --train_jsonl and --eval_jsonl",
                             "e.g. --task hops --n 3000")
    return Plan(name=args.name, train_jsonl=str(Path(args.train_jsonl).resolve()),
                eval_jsonl=str(Path(args.eval_jsonl).resolve()), difficulty_field=args.difficulty_field,
                state_field=args.state_field, model=args.model, seeds=list(range(args.seeds)),
                num_latents=args.num_latents, warmup_steps=args.warmup_steps, stage2_steps=args.stage2_steps,
                stage3_steps=args.stage3_steps, bsz=args.bsz, lr=args.lr, lr_scheduler=args.lr_scheduler,
                latent_grad=args.latent_grad, rows=list(args.rows), protocol=args.protocol, align=args.align,
                eval_records=args.eval_records,
                probe_records=args.probe_records, bf16=args.bf16, extra=args.extra.split(),
                thought_visibility=args.thought_visibility, teacher_forcing=args.teacher_forcing,
                min_teacher_benefit=args.min_teacher_benefit, criterion_every=args.criterion_every)


def _device() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


def run_experiment(args) -> dict:
    from lcot.toy.tiny import build_tiny

    if args.aggregate_only:
        run = Path(args.run_dir) / args.name
        if not (run / "plan.json").is_file():
            raise LcotInputError(str(run), "no plan.json: not the run folder of an experiment",
                                 "point --run_dir and --name at the folder lcot.experiment wrote")
        plan = Plan(**_renamed(json.loads((run / "plan.json").read_text())))
        return write_results(plan, run, Path(args.results_dir), {})
    check(args)
    plan = _plan(args)
    check_data(plan)
    run = (Path(args.run_dir) / plan.name).resolve()
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "plan.json"
    if saved.is_file() and _renamed(json.loads(saved.read_text())) != asdict(plan):
        raise LcotInputError(str(saved), "this run folder holds an experiment with other settings",
                             "use another --name, or delete the run folder to start over")
    write_json(saved, asdict(plan))
    for seed in plan.seeds:
        if plan.model in ("tiny", "8m"):
            build_tiny(_base(plan, seed, run), seed=seed, shape=plan.model)
    jobs = [j for seed in plan.seeds for j in jobs_for_seed(plan, seed, run)]
    if args.verbose:  # not part of the plan: a rerun with or without -v resumes the same jobs
        jobs = [Job(j.name, [*j.argv, "--verbose"] if j.argv[0] == "lcot.main" else j.argv, j.deps) for j in jobs]
    if args.dry_run:
        for j in jobs:
            print(f"{j.name}: python -m {' '.join(j.argv)}")
        return {}
    gpus = (args.gpus.split(",") if args.gpus else [str(i) for i in range(torch.cuda.device_count())])
    procs = args.procs or (6 * len(gpus) if gpus else 2)
    print(f"lcot.experiment {plan.name}: {len(jobs)} jobs, {procs} at once, on {_device()}; logs in {run / 'logs'}")
    info_file = run / "info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    info.update(device=_device(), procs=procs, torch=torch.__version__)
    spans = info.setdefault("invocations", [])  # [start, last update] of every invocation, a killed one too
    spans.append([time.time(), time.time()])

    def progress(line: str) -> None:
        print(line, flush=True)
        spans[-1][1] = time.time()
        info["wall_s"] = sum(b - a for a, b in spans)
        write_json(info_file, info)

    progress(f"lcot.experiment {plan.name}: started")
    info["jobs"] = run_jobs(jobs, run, procs, gpus, log=progress)
    progress(f"lcot.experiment {plan.name}: all jobs ended")
    return write_results(plan, run, Path(args.results_dir), info["jobs"])


def write_results(plan: Plan, run: Path, results_dir: Path, state: dict) -> dict:
    """results.json, table.md and figures of a run folder (all seeds' measurements)."""
    info = json.loads((run / "info.json").read_text()) if (run / "info.json").is_file() else {}
    agg = aggregate(plan, run)
    out = results_dir / plan.name
    write_json(out / "results.json", {"plan": asdict(plan), "info": info, **agg})
    table = table_md(plan, agg, info)
    (out / "table.md").write_text(table)
    made = figures(plan, agg, out)
    failed = [n for n, v in state.items() if not v.startswith(("done", "skipped"))]
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}" + "".join(f", {m}" for m in made))
    if failed:
        print(f"lcot: {len(failed)} job(s) did not finish: {', '.join(failed)}", file=sys.stderr)
    return {"plan": plan, "aggregate": agg, "state": state}


@cli_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        args = config.parse(MeasureConfig, argv[1:], f"{PROG} measure", MeasureConfig.__doc__)
        write_json(Path(args.out), measure(args))
        return
    args = config.parse(ExperimentConfig, argv, PROG, __doc__)
    quiet_libraries(args.verbose)
    run_experiment(args)


if __name__ == "__main__":
    main()
