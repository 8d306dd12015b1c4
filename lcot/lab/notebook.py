"""The first cells of every notebook: parameters -> folders, the base model, the data, cached earlier stages.

Each notebook starts with one parameter cell and then calls `setup`:

    MODEL = "tiny"    # "tiny": the offline ~1M-parameter model, built here; or a local Qwen2.5-VL folder
    DATA = "shapes"   # "shapes": the bundled synthetic data, generated here; or a folder with train/test.jsonl
    DEVICE = "cpu"    # or "cuda"
    S = setup("03_stage1_format", MODEL, DATA, DEVICE)

Folders: every notebook writes into its own run folder `<run root>/<notebook>`; the tiny model, the
data and the earlier stages a notebook needs but does not teach (`prerequisite`) are built once in
`<run root>/_shared` and reused by every notebook. The run root is `runs/notebooks` of the repository,
or $LCOT_RUN_DIR when set (the notebook tests point it into a temporary folder); figures go to
`<run root>/figures`, or $LCOT_FIGURES_DIR: a run never rewrites the committed `figures/` of the
repository, which only `make figures` refreshes (it sets LCOT_FIGURES_DIR=figures).

A real model (MODEL = a Qwen2.5-VL-7B-Instruct folder, DEVICE = "cuda") trains with bf16, LoRA,
gradient checkpointing and the truncated latent gradient (`Setup.train_flags`), which fits one
80 GB card; the tiny model trains in full precision with a large learning rate, in seconds.
Training (`lcot.pipeline.train.run_stage`, i.e. transformers' Trainer) uses the GPU whenever one is visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

TINY = "tiny"
SHAPES = "shapes"
SHAPES_N = 120  # records of the bundled data the notebooks use (96 train, 24 test)
RUN_DIR_ENV = "LCOT_RUN_DIR"
FIGURES_ENV = "LCOT_FIGURES_DIR"
CHAIN = ("stage1", "teacher", "stage2", "stage3")
PREREQUISITE_FILE = "notebook_prerequisite.json"


def repo_root() -> Path:
    """The lcot checkout the notebook runs in (found from the working folder, else from the package)."""
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "pyproject.toml").is_file() and (p / "lcot" / "__init__.py").is_file():
            return p
    pkg = Path(__file__).resolve().parents[1]
    return pkg if (pkg / "pyproject.toml").is_file() else here


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Setup:
    """Everything a notebook's cells take from the parameter cell (see the module docstring)."""

    name: str
    model: Path  # the base checkpoint: the tiny model built here, or MODEL
    train_jsonl: Path
    test_jsonl: Path
    device: str
    run: Path  # this notebook's folder
    shared: Path  # the tiny model, the data and cached prerequisite stages, shared by the notebooks
    figures: Path
    real: bool = field(default=False)  # MODEL is a real checkpoint, not the tiny one

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.real and self.device.startswith("cuda") else torch.float32

    def train_flags(self, steps: int) -> dict:
        """Keyword arguments of `lcot.pipeline.train.run_stage` (CLI flags) besides stage, model, data, K, steps."""
        # a notebook's runs are a few hundred steps: compiling the step (a minute or two on a GPU) would cost more
        # than it saves, and the teacher precompute runs the eager step too
        common = dict(seed=0, logging_steps=max(1, steps // 10), save_steps=100_000, compile_step="off")
        if not self.real:  # 1M random parameters: a large learning rate, full fine-tuning, fp32
            return dict(common, bsz=4, grad_accum_steps=1, learning_rate=2e-3, warmup_steps=0.05)
        flags = dict(common, bsz=1, grad_accum_steps=8, learning_rate=1e-4, warmup_steps=0.03, lora=True,
                     freeze_vision=True, gradient_checkpointing=True, latent_grad="truncated")
        return dict(flags, bf16=True) if self.device.startswith("cuda") else flags

    def load(self, path: str | Path | None = None):
        """(model, processor) of a checkpoint folder (default: the base model), on DEVICE, in eval mode."""
        from lcot.pipeline.load import load

        model, processor = load(path or self.model, self.dtype, self.device)
        return model.eval(), processor

    def records(self, split: str = "train", need_thought_images: bool = False):
        from lcot.pipeline.data import read_records

        return read_records(self.train_jsonl if split == "train" else self.test_jsonl,
                            need_thought_images=need_thought_images)

    def save(self, fig_or_ax, filename: str) -> Path:
        """Save a figure as <figures>/<filename> (PNG, stable name; see `setup`) and say where it went."""
        from lcot.lab.plots import save

        path = save(fig_or_ax, self.figures / filename)
        print(f"saved {path}")
        return path

    def __repr__(self) -> str:
        rows = [("notebook", self.name), ("base model", self.model), ("train", self.train_jsonl),
                ("test", self.test_jsonl), ("device", f"{self.device} ({str(self.dtype).replace('torch.', '')})"),
                ("run folder", self.run), ("shared folder", self.shared), ("figures", self.figures)]
        return "\n".join(f"{k:>13}: {v}" for k, v in rows)


def _data(data: str | Path, shared: Path) -> tuple[Path, Path]:
    from lcot.errors import LcotInputError
    from lcot.toy.synthetic import generate

    if str(data) == SHAPES:
        paths = generate(shared / f"shapes-n{SHAPES_N}", n=SHAPES_N, seed=0)
        return Path(paths["train"]), Path(paths["test"])
    p = Path(data)
    if p.is_file():  # one JSONL: trained and evaluated on
        return p, p
    if (p / "train.jsonl").is_file():
        test = p / "test.jsonl"
        return p / "train.jsonl", test if test.is_file() else p / "train.jsonl"
    raise LcotInputError("DATA", f"{data} is neither 'shapes', a JSONL file nor a folder with train.jsonl",
                         "point DATA at a folder holding train.jsonl (and test.jsonl)")


def setup(name: str, model: str | Path = TINY, data: str | Path = SHAPES, device: str = "cpu",
          run_root: str | Path | None = None, figures: str | Path | None = None, threads: int | None = 1,
          seed: int = 0) -> Setup:
    """Resolve the parameter cell: build the tiny model and the data when asked (reused when present).

    threads: torch CPU threads. One is the default: the tiny model is launch-bound, and on shared
    cores several threads per process spin against each other (10x slower measured on 2 busy cores).
    """
    from lcot.toy.tiny import build_tiny

    root = repo_root()
    run_root = Path(run_root or os.environ.get(RUN_DIR_ENV) or root / "runs" / "notebooks").absolute()
    figures = Path(figures or os.environ.get(FIGURES_ENV) or run_root / "figures").absolute()
    shared = run_root / "_shared"
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    real = str(model) != TINY
    model_dir = Path(model).absolute() if real else build_tiny(shared / "tiny", seed=0)
    train, test = _data(data, shared)
    run = run_root / name
    run.mkdir(parents=True, exist_ok=True)
    return Setup(name, Path(model_dir), train, test, device, run, shared, figures, real)


def prerequisite(s: Setup, stage: str, num_latents: int, steps: int) -> Path:
    """The folder of `stage` ("stage1", "teacher", "stage2" or "stage3") of the notebooks' standard chain.

    The chain is base model -> stage1 -> teacher latents -> stage2 -> stage3, each stage trained for
    `steps` optimizer steps with K = `k` (stage3: Kmax = k) and `s.train_flags`. It is built on first
    use, every missing stage before `stage` included, under `s.shared`, in a folder named by a hash of
    the settings, and reused by every notebook that asks for the same settings.
    """
    from lcot.pipeline.teacher import precompute
    from lcot.pipeline.train import run_stage

    if stage not in CHAIN:
        raise ValueError(f"stage must be one of {CHAIN}, got {stage!r}")
    key = {"model": str(s.model), "train": str(s.train_jsonl), "k": num_latents, "steps": steps, "dtype": str(s.dtype),
           "flags": {k: v for k, v in s.train_flags(steps).items() if k != "compile_step"}}  # same results
    folder = s.shared / f"chain-{_digest(key)}"
    out = {}
    rebuilt = False  # once a stage is rebuilt, every later one is too (it was made from the old one)
    for name in CHAIN[: CHAIN.index(stage) + 1]:
        out[name] = folder / name
        marker = out[name] / PREREQUISITE_FILE
        if not rebuilt and marker.is_file() and json.loads(marker.read_text()) == key:
            print(f"prerequisite {name}: reusing {out[name]}")
            continue
        rebuilt = True
        print(f"prerequisite {name}: building {out[name]}")
        if name == "teacher":
            shutil.rmtree(out[name], ignore_errors=True)  # precompute keeps files per record, not per model
            model, processor = s.load(out["stage1"])
            precompute(model, processor, s.records(need_thought_images=True), out[name], num_latents, batch_size=16,
                       model_name=str(out["stage1"]), progress=False)
            del model
        else:
            source = {"stage1": s.model, "stage2": out.get("stage1"), "stage3": out.get("stage2")}[name]
            teacher = out["teacher"] if name != "stage1" else None
            run_stage(stage=name, model_name_or_path=source, train_jsonl=s.train_jsonl, output_dir=out[name],
                      num_latents=num_latents, max_steps=steps, teacher_latent_dir=teacher, overwrite_output_dir=True,
                      **s.train_flags(steps))
        marker.write_text(json.dumps(key, indent=1))
    return out[stage]
