"""`python benchmarks/bench.py` on the tiny shape (CPU, one iteration) so the GPU benchmark script cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SMALL = ["--shape", "tiny", "--batch", "2", "--latent_size", "3", "--iters", "1", "--warmup", "0",
         "--decode_tokens", "2", "--question_images", "1", "--question_tokens", "8", "--answer_tokens", "4",
         "--dtype", "fp32", "--device", "cpu"]
ROWS = ["sft", "latent_full", "latent_truncated", "latent_truncated_static", "latent_truncated_graph",
        "latent_adjoint", "latent_bptt1", "latent_bptt2", "steps",
        "forward",
        "teacher", "teacher_static", "teacher_graph", "teacher_steps", "floor", "gen_decode_eager", "gen_latent_eager",
        "gen_decode_graph",
        "gen_latent_graph", "numerics_fp32"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    yield
    torch.set_num_threads(n)


def test_bench_tiny_has_every_row(tmp_path, one_thread, capsys):
    out = tmp_path / "bench.md"
    rows = bench.main([*SMALL, "--out", str(out)])  # the default: packed vision attention
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == ROWS
    for name in ROWS[:-1]:
        r = by_name[name]
        assert not r["note"].startswith("error"), (name, r["note"])
        assert r["time_s"] is not None and math.isfinite(r["time_s"]) and r["time_s"] > 0, name
    for name, base in [("latent_full", "sft"), ("latent_truncated_graph", "sft"), ("teacher_graph", "forward"),
                       ("gen_latent_graph", "gen_decode_graph")]:
        assert by_name[name]["baseline"] == base and math.isfinite(by_name[name]["ratio"]), name
    assert by_name["numerics_fp32"]["value"] < 1e-4  # graphed (here: static eager) == eager latents in fp32
    floor, steps = by_name["floor"], by_name["steps"]["time_s"]
    assert floor["unit"] == "s/step" and 0 < floor["time_s"] < steps / 3  # 3 steps: the floor is below each
    for name in ("latent_truncated_graph", "latent_adjoint", "teacher_graph"):
        assert f"{name} {by_name[name]['ratio']:.2f}x -> " in floor["note"], name
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in ROWS)
    assert out.read_text().count("\n| ") == len(ROWS) + 1  # header + one line per row
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["name"] for r in data["rows"]] == ROWS
    assert data["env"]["num_latents"] == 3 and data["env"]["device"].startswith("cpu") and data["env"]["packed_vision"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert data["env"]["commit"].startswith(head or "unknown") and data["env"]["date"].endswith(" UTC")
    assert "- commit: " in out.read_text() and "- date: " in out.read_text()


def test_bench_lora_checkpointing_stage3(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    rows = bench.main([*SMALL, "--lora", "--gradient_checkpointing", "--stages", "stage2,stage3", "--out", str(out)])
    by_name = {r["name"]: r for r in rows}
    assert by_name["latent_full"]["note"].startswith("n/a")  # incompatible with checkpointing, said so
    for name in ["sft", "latent_truncated_graph", "stage3:sft", "stage3:latent_truncated_graph"]:
        assert math.isfinite(by_name[name]["time_s"]), (name, by_name[name]["note"])
    assert by_name["stage3:latent_truncated"]["baseline"] == "stage3:sft"
    env = json.loads(out.read_text())["env"]
    assert env["lora"] and env["trainable"] < env["params"] and env["seq_len"]["stage3"] < env["seq_len"]["stage2"]


def test_bench_autocast_lora_rows_run_and_need_bf16(tmp_path, one_thread):
    """--autocast: the trainer's bf16 autocast over the training rows (peft's fp32 adapters cast per product)."""
    out = tmp_path / "bench.json"
    rows = bench.main([*SMALL, "--dtype", "bf16", "--lora", "--gradient_checkpointing", "--autocast",
                       "--rows", "sft,latent_truncated_graph,steps", "--out", str(out)])
    assert all(math.isfinite(r["time_s"]) for r in rows), [r["note"] for r in rows]
    assert json.loads(out.read_text())["env"]["autocast"]
    with pytest.raises(SystemExit, match="--dtype bf16"):  # an fp32 model under autocast is not the trainer's path
        bench.main([*SMALL, "--autocast", "--rows", "sft"])


@pytest.mark.parametrize("flag", ["--packed_vision", "--no-packed_vision"])
def test_bench_vision_attention_is_the_same_in_every_row(tmp_path, one_thread, flag):
    """The plain SFT step and the latent rows alike use lcot's packed vision attention (the default, as lcot
    trains), or all transformers' sdpa path."""
    from lcot.fast.vision import PACKED

    out = tmp_path / "bench.json"
    seen = []
    real = bench.Bench.setup

    def setup(self):
        real(self)
        seen.append(self.model.model.visual.config._attn_implementation)

    bench.Bench.setup = setup
    try:
        rows = bench.main([*SMALL, flag, "--rows", "sft,latent_truncated_graph", "--out", str(out)])
    finally:
        bench.Bench.setup = real
    packed = flag == "--packed_vision"
    assert seen == [PACKED if packed else "sdpa"] and json.loads(out.read_text())["env"]["packed_vision"] == packed
    assert all(math.isfinite(r["time_s"]) for r in rows)


def test_runner_switches_map_to_the_runner_keywords():
    """bench.py's runner switches give lcot.fast.Runner's keywords; the defaults are lcot's, but for the eager step
    (--compile_step off)."""
    defaults = bench.runner_options(bench.parser().parse_args([]))
    assert defaults == {"compile_step": "off", "kernels": True, "step_attention": "flex", "vision": True,
                        "cast_adapters": True, "adjoint_graphs": True, "adjoint_compile": True}
    args = bench.parser().parse_args(["--compile_step", "on", "--kernels", "off", "--step_attention", "sdpa",
                                      "--no-packed_vision", "--no_cast_adapters", "--adjoint_graphs", "off",
                                      "--adjoint_compile", "off"])
    assert bench.runner_options(args) == {"compile_step": "on", "kernels": False, "step_attention": "sdpa",
                                          "vision": False, "cast_adapters": False, "adjoint_graphs": False,
                                          "adjoint_compile": False}
    assert bench.runner_options(bench.parser().parse_args(["--kernels", "interpret"]))["kernels"] == "interpret"
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--step_attention", "eager"])


@pytest.mark.parametrize("switches,attention", [([], "lcot_sdpa_steps"),
                                                (["--kernels", "off", "--step_attention", "stock",
                                                  "--no_cast_adapters", "--adjoint_graphs", "off",
                                                  "--adjoint_compile", "off"], "sdpa")])
def test_bench_rows_share_one_runner_built_by_the_switches(tmp_path, one_thread, monkeypatch, switches, attention):
    """Every row runs on the one lcot.fast.Runner setup attaches (its path switched per row), built with the
    switches' keywords; the table records them."""
    from lcot.fast import Runner

    seen = []
    real = bench.Bench.setup

    def setup(self):
        real(self)
        seen.append(self.runner)

    monkeypatch.setattr(bench.Bench, "setup", setup)
    out = tmp_path / "bench.json"
    rows = bench.main([*SMALL, *switches, "--rows", "sft,latent_truncated,latent_adjoint,teacher_graph",
                       "--out", str(out)])
    assert [r["name"] for r in rows] == ["sft", "latent_truncated", "latent_adjoint", "teacher_graph"]
    assert all(math.isfinite(r["time_s"]) and not r["note"].startswith("error") for r in rows), rows
    runner, = seen
    assert isinstance(runner, Runner) and runner.model.lcot_runner is runner
    assert runner.model.config.text_config._attn_implementation == attention
    assert runner.fast == "graph" and not runner.step_compiled(runner.model)  # the last row's path; eager step
    env = json.loads(out.read_text())["env"]
    assert env["runner"] == bench.runner_options(bench.parser().parse_args(switches))
    assert (runner.kernels, runner.casts is None, runner.adjoint_state.graphs, runner.adjoint_state.compile) == (
        (False, True, False, False) if switches else (True, False, True, True))


def test_shapes_match_published_sizes():
    tok = bench.make_processor(112).tokenizer
    c3, c7 = bench.make_config("3b", tok), bench.make_config("7b", tok)
    assert (c3.text_config.hidden_size, c3.text_config.num_hidden_layers, c3.text_config.num_key_value_heads,
            c3.text_config.vocab_size, c3.vision_config.out_hidden_size) == (2048, 36, 2, 151936, 2048)
    assert (c7.text_config.hidden_size, c7.text_config.num_hidden_layers, c7.text_config.num_attention_heads,
            c7.text_config.intermediate_size, c7.vision_config.out_hidden_size) == (3584, 28, 28, 18944, 3584)
    assert c3.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    for c in (c3, c7):
        head_dim = c.text_config.hidden_size // c.text_config.num_attention_heads
        assert sum(c.text_config.rope_parameters["mrope_section"]) * 2 == head_dim


def test_floor_bound_swaps_the_measured_steps_for_steps_at_the_floor():
    # a row at 1.8x a 0.5 s baseline whose 32 steps took 0.2 s: with 32 steps of 2 ms it would be 1.528x
    # a row of 0.9 s at 1.8x whose 32 steps took 0.2 s: with 32 steps of 2 ms it would take 0.764 s, 1.528x
    assert bench.floor_bound(1.8, 0.9, 0.2, 32, 0.002) == pytest.approx(1.8 * 0.764 / 0.9)
    assert bench.floor_bound(1.8, 0.9, 0.2, 32, 0.2 / 32) == pytest.approx(1.8)  # steps already at the floor
    # a paired ratio (1.6x) measured apart from the row's time: the steps' share of the row is what shrinks
    assert bench.floor_bound(1.6, 0.9, 0.2, 32, 0.002) == pytest.approx(1.6 * 0.764 / 0.9)


def test_step_bytes_counts_the_weights_a_step_reads_and_the_cache(loaded):
    model = loaded[0]
    cfg = model.config.text_config
    lm = model.model.language_model
    weights = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    kv = 2 * cfg.num_hidden_layers * 3 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 256
    assert weights < sum(p.numel() for p in lm.parameters())  # the table is left out
    assert bench.step_bytes(model, 3, 256) == (weights + kv) * model.dtype.itemsize


def test_save_model_loads(tmp_path):
    from lcot.pipeline.load import load

    bench.main(["--shape", "tiny", "--save_model", str(tmp_path / "m"), "--device", "cpu"])
    model, processor = load(tmp_path / "m")
    assert processor.tokenizer.convert_tokens_to_ids("<abs_vis_token>") is not None
    assert model.config.text_config.hidden_size == 128


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_busy_time_is_the_union_of_kernel_intervals():
    busy = _script("profile_step").busy_time
    assert busy([(0, 2), (1, 3), (5, 6), (5.5, 5.7), (5.9, 6.0)]) == 4
    assert busy([(3, 4), (0, 1)]) == 2 and busy([]) == 0


def test_profile_step_and_graph_check_run_on_a_cpu(tiny_dir, data_dir, tmp_path, one_thread):
    """The profile of real training steps (a CPU reports ops and wall time, no kernels), and the graph check
    (on a CPU no graph applies, so graphed and eager are the same path: 0.0)."""
    ps = _script("profile_step")
    common = ["--model", str(tiny_dir), "--train_jsonl", str(data_dir / "train.jsonl"), "--bsz", "2"]
    report = ps.main([*common, "--output_dir", str(tmp_path / "out"), "--skip", "1", "--profile_steps", "2",
                      "--workers", "0", "--json", str(tmp_path / "r.json")])
    assert report["steps"] == 2 and report["wall_ms_per_step"] > 0 and report["cpu_ops_per_step"] > 500
    assert report["kernels_per_step"] == 0 and json.loads((tmp_path / "r.json").read_text())["bsz"] == 2
    check = ps.main([*common, "--check_graph_pass"])
    assert check["max_abs_diff_hidden"] == check["max_abs_diff_grad"] == 0.0 and check["pass_captures"] == 0


def test_small_speed_steady_rate_reads_the_progress_bar():
    rate = _script("small_speed").steady_rate
    bar = "\r".join(f"{n}/40 [00:{n // 4:02d}<00:10," for n in range(0, 41, 4))
    assert rate(bar, 40, 64) == pytest.approx(64 * 4)  # 4 steps a second from step 10 on
    assert rate("nothing", 40, 64) is None


def test_paired_ratio_alternates_and_takes_the_median(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock) * 1.0)
    durations = {"base": [1, 2, 1], "fn": [3, 2, 4]}  # clock ticks spent per call (the stubs advance the clock)

    def stub(name):
        def f():
            calls.append(name)
            for _ in range(durations[name][sum(c == name for c in calls) - 1] - 1):
                next(clock)
        return f

    ratio, ratios = bench.paired_ratio(stub("fn"), stub("base"), 3, torch.device("cpu"))
    assert calls == ["base", "fn"] * 3 and ratios == [3.0, 1.0, 4.0] and ratio == 3.0


def test_bench_paired_notes_the_alternating_ratio(tmp_path, one_thread):
    rows = bench.main([*SMALL, "--paired", "2", "--rows", "sft,latent_truncated_graph,forward,teacher_graph"])
    by_name = {r["name"]: r for r in rows}
    for name in ("latent_truncated_graph", "teacher_graph"):
        assert "paired ratio" in by_name[name]["note"] and "of 2 alternating pairs" in by_name[name]["note"], name
    assert "paired" not in by_name["sft"]["note"]  # a baseline has no ratio


def test_a_given_commit_wins_over_git(monkeypatch):
    """A GPU machine that got a copy of the tree may carry a stale .git: the commit given with LCOT_COMMIT (metadata
    only) is the one a table names."""
    monkeypatch.setenv("LCOT_COMMIT", "abc1234")
    assert bench.source_commit() == "abc1234"
    monkeypatch.delenv("LCOT_COMMIT")
    assert bench.source_commit() != "abc1234"


def test_floor_table_recomputes_the_committed_bounds(capsys):
    """`python benchmarks/floor_table.py results/bench_h100_floor/*.json`, as the README shows: the bounds quoted in
    README.md and RESULTS.md come from it."""
    spec = importlib.util.spec_from_file_location("floor_table", Path(__file__).parents[1] / "benchmarks" /
                                                  "floor_table.py")
    floor_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor_table)
    paths = sorted(str(p) for p in (Path(__file__).parents[1] / "results" / "bench_h100_floor").glob("*.json"))
    floor_table.main(paths)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 26  # 17 tables, 26 latent rows
    row = ("| b7_floor_eager | NVIDIA H100 80GB HBM3, e899b5f, 2 | latent_truncated_graph | 1.93x | 1.41x "
           "| 14.42 (4.61) |")
    assert row in lines
    assert any("b7_floor_teacher_batch2" in line and "| 3.81x | 2.36x |" in line for line in lines)
