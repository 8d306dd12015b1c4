"""Training to a criterion: a stage checks held-out records every N steps and stops once the check passes."""

from __future__ import annotations

import json

import pytest

from lcot.pipeline import train
from lcot.pipeline.runs import read_metrics


@pytest.mark.parametrize("accuracy, met_at, steps", [(0.0, 2, 2), (2.0, None, 6)])
def test_a_stage_stops_when_its_check_passes_or_runs_to_its_cap(tiny_dir, data_dir, tmp_path, capsys, accuracy,
                                                                   met_at, steps):
    out = tmp_path / "warm"
    train.main(["--stage", "vcot", "--model_name_or_path", str(tiny_dir), "--output_dir", str(out),
                "--train_jsonl", str(data_dir / "train.jsonl"), "--latent_size", "2", "--bsz", "4",
                "--grad_accum_steps", "1", "--max_steps", "6", "--logging_steps", "1", "--warmup_steps", "0",
                "--report_to", "none", "--criterion_every", "2", "--criterion_records", "6",
                "--criterion_accuracy", str(accuracy), "--criterion_benefit", "-1"])
    info = json.loads((out / "lcot.json").read_text())["criterion"]
    assert info["met_at"] == met_at and info["steps"] == steps and info["records"] == 6
    assert [c["step"] for c in info["checks"]] == list(range(2, steps + 1, 2))
    assert all(0 <= c["with"] <= 1 and c["benefit"] == pytest.approx(c["with"] - c["without"]) for c in info["checks"])
    assert len(read_metrics(out)) == steps
    printed = capsys.readouterr().out
    assert "lcot: check at step 2:" in printed and (": met, stopping" in printed) == (met_at is not None)


def test_the_criterion_is_refused_where_it_cannot_work(tiny_dir, data_dir, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "x"), "--train_jsonl",
            str(data_dir / "train.jsonl"), "--criterion_every", "2"]
    for flags, message in {("--stage", "stage1"): "checks the thought-image benefit of vcot or stage2, not of stage1",
                           ("--stage", "vcot", "--criterion_records", "1000"): "leaves none to train on"}.items():
        with pytest.raises(SystemExit) as exc:
            train.main([*base, *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err
