"""lcot.experiment: the aggregation against hand-computed numbers, and the CLI end to end with a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcot import experiment as E


def _setting(acc: float, by: dict, const: str | None = None) -> dict:
    return {"accuracy": acc, "constant": const, "by_difficulty": by}


def _plan(tmp_path: Path, seeds=(0, 1), protocol: str = "warmup-teacher") -> E.Plan:
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"question": "q", "answer": f"#### {a}", "question_image_paths": [],
                                        "thought_image_paths": []}) + "\n" for a in "aab"))
    return E.Plan(name="t", train_jsonl=str(data), eval_jsonl=str(data), difficulty_field="hops", state_field=None,
                  model="tiny", seeds=list(seeds), num_latents=2, warmup_steps=1, stage2_steps=1, stage3_steps=1,
                  bsz=1, lr=1e-3, lr_scheduler="constant", latent_grad="truncated", rows=list(E.ROWS),
                  protocol=protocol, align="centered", eval_records=0, probe_records=0)


def _write(run: Path, seed: int, model: str, obj: dict) -> None:
    path = run / f"s{seed}" / "measure" / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_aggregate_means_gap_recovered_and_warnings(tmp_path):
    plan, run = _plan(tmp_path), tmp_path / "run"
    for seed, (vcot, nolat, s3) in enumerate([(0.9, 0.3, 0.6), (1.0, 0.2, 0.4)]):
        _write(run, seed, "warmup", {"settings": {"with": {"2": _setting(vcot, {"1": vcot, "2": vcot})},
                                                  "without": {"2": _setting(0.1, {"1": 0.1, "2": 0.1})}}})
        _write(run, seed, "nolatent", {"settings": {"without": {"0": _setting(nolat, {"1": 0.5, "2": nolat},
                                                                               const="red" if seed else None)}}})
        _write(run, seed, "stage3", {"settings": {"without": {"1": _setting(0.2, {}), "2": _setting(s3, {"1": 0.7,
                                                                                                      "2": s3})}},
                                     "latent_cos_across": [0.995, 0.999]})
        _write(run, seed, "stage2", {"settings": {"with": {"2": _setting(0.5, {})},
                                                  "without": {"2": _setting(0.48, {})}}})
    for model in ("warmup", "nolatent", "stage3", "stage2"):
        for seed in (0, 1):
            path = run / f"s{seed}" / "measure" / f"{model}.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "majority": 2 / 3, "n": 3}))
    agg = E.aggregate(plan, run)
    rows = {r["model"] + "/" + r["setting"] + str(r["k"]): r for r in agg["rows"]}
    assert rows["stage3/without2"]["overall"]["mean"] == pytest.approx(0.5)
    assert rows["stage3/without2"]["overall"]["std"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) / 1) ** 0.5)
    assert rows["nolatent/without0"]["constant"] == ["red"]
    gaps = agg["gap_recovered"]["overall"]["per_seed"]
    assert gaps == {"0": pytest.approx((0.6 - 0.3) / (0.9 - 0.3)), "1": pytest.approx((0.4 - 0.2) / (1.0 - 0.2))}
    assert agg["gap_recovered"]["1"]["per_seed"]["0"] == pytest.approx((0.7 - 0.5) / (0.9 - 0.5))
    assert agg["teacher_benefit"]["stage2"]["mean"] == pytest.approx(0.02)
    assert agg["teacher_benefit"]["warmup"]["mean"] == pytest.approx(0.85)  # visual CoT 0.9/1.0 vs 0.1
    assert agg["collapse"]["stage3"]["mean"] == pytest.approx(0.997)
    assert agg["majority"] == pytest.approx(2 / 3)
    text = E.table_md(plan, agg, {"device": "test", "wall_s": 60})
    assert "constant predictor in 1/2 seeds (answers \"red\" for every record)" in text
    assert "0.500 ± 0.141" in text
    assert "WARNING: near zero" in text and "WARNING: the latents have collapsed" in text
    assert "pause control" not in text  # rows without measurements are left out, not printed as zeros


def test_a_seed_whose_teacher_reads_no_thought_image_is_a_failed_protocol(tmp_path):
    """stage2-teacher: seed 1's stage2 gains 0.02 from its thought images, so its rows are left out of the means and
    the table says why; when no seed's teacher reads them, the table says the run shows nothing."""
    plan, run = _plan(tmp_path, protocol="stage2-teacher"), tmp_path / "run"
    for seed, (benefit, s3) in enumerate([(0.6, 0.7), (0.02, 0.3)]):
        _write(run, seed, "stage2", {"settings": {"with": {"2": _setting(0.3 + benefit, {})},
                                                  "without": {"2": _setting(0.3, {})}}, "majority": 0.4})
        _write(run, seed, "stage3", {"settings": {"without": {"2": _setting(s3, {})}}})
    agg = E.aggregate(plan, run)
    assert set(agg["failed"]) == {"1"} and "protocol failed at stage2 (the teacher): 0.320 with" in agg["failed"]["1"]
    stage3 = next(r for r in agg["rows"] if r["model"] == "stage3")
    assert stage3["overall"]["mean"] == pytest.approx(0.7) and stage3["seeds"] == 1
    assert agg["teacher_benefit"]["stage2"]["per_seed"] == {"0": pytest.approx(0.6), "1": pytest.approx(0.02)}
    text = E.table_md(plan, agg, {"device": "test", "wall_s": 60})
    assert "**Seed 1: protocol failed at stage2 (the teacher)" in text and "not averaged" in text
    assert "shows nothing" not in text
    table = text.splitlines().index("| row | overall | notes |")
    assert all(line.startswith("|") for line in text.splitlines()[table:table + 4])  # nothing breaks the table
    _write(run, 0, "stage2", {"settings": {"with": {"2": _setting(0.35, {})}, "without": {"2": _setting(0.3, {})}}})
    agg = E.aggregate(plan, run)
    assert set(agg["failed"]) == {"0", "1"} and not agg["rows"]
    text = E.table_md(plan, agg, {})
    assert "No seed passed the protocol: this run shows nothing" in text
    assert "No rows: every seed failed the protocol" in text and "| row |" not in text


def test_a_warmup_that_reads_no_thought_image_fails_first_and_steps_used_are_reported(tmp_path):
    plan, run = _plan(tmp_path, protocol="stage2-teacher"), tmp_path / "run"
    for seed, (warm, met) in enumerate([(0.9, 300), (0.2, None)]):
        crit = {"steps": met or 3000, "met_at": met}
        _write(run, seed, "warmup", {"settings": {"with": {"2": _setting(warm, {})},
                                                  "without": {"2": _setting(0.2, {})}}, "criterion": crit})
        _write(run, seed, "stage2", {"settings": {"with": {"2": _setting(0.9, {})},
                                                  "without": {"2": _setting(0.2, {})}}})
    agg = E.aggregate(plan, run)
    assert set(agg["failed"]) == {"1"}
    assert agg["failed"]["1"].startswith("protocol failed at the warm-up: 0.200 with") and "after 3000 steps" in \
        agg["failed"]["1"]
    assert agg["steps_used"] == {"warmup": {"0": [300, 300], "1": [3000, None]}}
    text = E.table_md(plan, agg, {})
    assert "Steps used by warmup (trained to its criterion, cap 1): seed 0 300 (met), seed 1 3000 (not met)." in text


def test_gap_is_undefined_without_a_gap():
    assert E._gap(0.31, 0.30, 0.5) is None
    assert E._gap(0.8, 0.4, 0.6) == pytest.approx(0.5)
    assert E._gap(None, 0.4, 0.6) is None


@pytest.mark.slow  # about 80 s on 2 CPU cores
def test_experiment_cli_end_to_end_and_resume(tmp_path):
    argv = ["--name", "e2e", "--task", "hops", "--n", "30", "--seeds", "2", "--latent_size", "2",
            "--warmup_steps", "2", "--stage2_steps", "2", "--stage3_steps", "2", "--bsz", "4", "--probe_records", "12",
            "--rows", "pause", "nolatent", "--min_teacher_benefit", "-1", "--run_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--procs", "2"]
    first = E.run_experiment(E.config.parse(E.ExperimentConfig, argv, "x"))
    assert all(v == "done" for v in first["state"].values()), first["state"]
    out = tmp_path / "results" / "e2e"
    res = json.loads((out / "results.json").read_text())
    labels = [r["row"] for r in res["rows"]]
    assert "no-latent SFT (K=0)" in labels and "pause control (K=2)" in labels and "latent, stage3 (K=2)" in labels
    assert all(r["seeds"] == 2 for r in res["rows"])
    assert {c["condition"] for c in res["causal"]} == set(E.CAUSAL)
    assert res["probe"]["stage3"]["accuracy"] and (out / "table.md").read_text().count("\n|") > 10
    assert (out / "accuracy_by_difficulty.png").stat().st_size > 0 and (out / "probe.png").is_file()
    # resume: a finished job is skipped; a job whose marker is gone (killed before it finished) runs again
    run = tmp_path / "runs" / "e2e"
    (run / "done" / "s1__measure_nolatent.json").unlink()
    second = E.run_experiment(E.config.parse(E.ExperimentConfig, argv, "x"))
    assert second["state"]["s1/measure_nolatent"] == "done"
    assert sum(v == "done" for v in second["state"].values()) == 1
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    with pytest.raises(Exception, match="other settings"):
        E.run_experiment(E.config.parse(E.ExperimentConfig, [*argv, "--lr", "0.5"], "x"))


def test_curriculum_row_shares_stage2_and_adds_its_flag_to_stage3_only(tmp_path):
    plan = _plan(tmp_path)
    jobs = {j.name: j for j in E.jobs_for_seed(plan, 0, tmp_path / "run")}
    cur = jobs["s0/curriculum"]
    assert "--latent_curriculum" in cur.argv and cur.deps[0] == "s0/stage2"
    assert cur.argv[cur.argv.index("--model_name_or_path") + 1] == str(tmp_path / "run" / "s0" / "stage2")
    assert not any("--latent_curriculum" in j.argv for n, j in jobs.items() if n != "s0/curriculum")
    assert "s0/curriculum_stage2" not in jobs
    assert "--causal" in jobs["s0/measure_curriculum"].argv


def test_curriculum_gap_and_causal_rows_are_aggregated(tmp_path):
    plan, run = _plan(tmp_path, seeds=(0,)), tmp_path / "run"
    _write(run, 0, "warmup", {"settings": {"with": {"2": _setting(0.9, {"1": 0.9})},
                                           "without": {"2": _setting(0.2, {"1": 0.2})}}})
    _write(run, 0, "nolatent", {"settings": {"without": {"0": _setting(0.3, {"1": 0.3})}}})
    causal = {c: {"accuracy": 0.3, "changed": 0.5, "by_difficulty": {"1": 0.3}} for c in E.CAUSAL}
    _write(run, 0, "curriculum", {"settings": {"without": {"1": _setting(0.4, {}), "2": _setting(0.6, {"1": 0.6})}},
                                  "causal": causal})
    agg = E.aggregate(plan, run)
    assert agg["gap_recovered_curriculum"]["overall"]["mean"] == pytest.approx(0.5)
    assert agg["gap_recovered"]["overall"]["mean"] is None  # no stage3 measured
    assert [c["model"] for c in agg["causal"]] == ["curriculum"] * len(E.CAUSAL)
    assert "curriculum over K (K=2)" in E.table_md(plan, agg, {})
