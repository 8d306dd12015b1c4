"""The kit without its fast layer: with `lcot.fast` unimportable, `--fast off` trains (stage1, stage2), precomputes
the teacher and generates, and gives the values the runner gives (`--fast static`: its static cache and steps, its
packed vision and grouped step attention)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lcot.pipeline.runs import read_metrics

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    tiny, data, out, fast = sys.argv[1:5]
    if fast == "off":
        sys.modules["lcot.fast"] = None  # any import of the fast layer now raises ImportError
    from lcot.pipeline import train
    from lcot.pipeline.generate import generate
    from lcot.pipeline.load import load
    from lcot.pipeline.data import read_records
    from lcot.precompute_teacher_latents import main as precompute
    out = Path(out)
    speed = ["--fast", fast]
    base = ["--train_jsonl", f"{data}/train.jsonl", "--bsz", "4", "--grad_accum_steps", "1", "--seed", "0",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "1000",
            "--latent_size", "3", "--report_to", "none", *speed]
    train.main(["--stage", "stage1", "--model_name_or_path", tiny, "--output_dir", str(out / "s1"),
                "--max_steps", "3", *base])
    precompute(["--model_name_or_path", str(out / "s1"), "--train_jsonl", f"{data}/train.jsonl",
                "--output_dir", str(out / "teacher"), "--k_max", "3", "--bsz", "4", *speed])
    train.main(["--stage", "stage2", "--model_name_or_path", str(out / "s1"), "--output_dir", str(out / "s2"),
                "--max_steps", "2", "--teacher_latent_dir", str(out / "teacher"), "--align_weight", "1.0", *base])
    from lcot.config import SpeedConfig
    model, processor = load(out / "s2", speed=SpeedConfig(fast=fast))
    gens = generate(model.eval(), processor, read_records(f"{data}/test.jsonl")[:4], num_latents=3,
                    batch_size=4, max_new_tokens=4, progress=False)
    torch.save({"texts": [g.text for g in gens], "latents": torch.stack([g.latents for g in gens])},
               out / "generated.pt")
    assert sys.modules.get("lcot.fast", None) is None if fast == "off" else "lcot.fast" in sys.modules
    print(json.dumps({"fast_loaded": sys.modules.get("lcot.fast") is not None}))
""")


def run_kit(tiny_dir: Path, data_dir: Path, out: Path, fast: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_dir), str(data_dir), str(out), fast],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def losses(folder: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(folder)]


def test_the_kit_runs_without_its_fast_layer_with_the_runners_values(tiny_dir, data_dir, tmp_path):
    assert run_kit(tiny_dir, data_dir, tmp_path / "off", "off") == {"fast_loaded": False}
    assert run_kit(tiny_dir, data_dir, tmp_path / "fast", "static") == {"fast_loaded": True}
    off, fast = tmp_path / "off", tmp_path / "fast"
    for stage in ("s1", "s2"):
        assert len(losses(off / stage)) >= 2
        assert losses(off / stage) == pytest.approx(losses(fast / stage), rel=1e-5, abs=1e-6), stage
    files = sorted(p.name for p in (off / "teacher").glob("latent_last_layer_jsonl_*.pt"))
    assert files and files == sorted(p.name for p in (fast / "teacher").glob("latent_last_layer_jsonl_*.pt"))
    for name in files:
        a = torch.load(off / "teacher" / name, weights_only=True)["latents"]
        b = torch.load(fast / "teacher" / name, weights_only=True)["latents"]
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)  # |latent| ~ 11: ulps of training differ
    a, b = torch.load(off / "generated.pt"), torch.load(fast / "generated.pt")
    assert a["texts"] == b["texts"]
    torch.testing.assert_close(a["latents"], b["latents"], atol=2e-4, rtol=1e-4)
