"""Per-position metrics that can fail: the centred cosine of each latent to its own record's teacher and to another
record's, in latent_metrics.jsonl and as TensorBoard scalars."""

from __future__ import annotations

import math

import torch

from lcot.core.loss import centred_cosines
from lcot.pipeline import train
from lcot.pipeline.runs import read_metrics


def test_centred_cosines_tell_the_own_teacher_from_another_records():
    gen = torch.Generator().manual_seed(0)
    common = 50 * torch.randn(1, 3, 16, generator=gen)  # a large shared direction, as in trained latents
    teacher = common + torch.randn(4, 3, 16, generator=gen)
    center = teacher.mean(0)
    own, other = centred_cosines(teacher.clone(), teacher, center)  # a student that is its teacher
    torch.testing.assert_close(own, torch.ones(3))
    assert other.max() < 0.5
    own, other = centred_cosines(teacher.roll(1, 0), teacher, center)  # a student holding the previous record's
    torch.testing.assert_close(other, torch.ones(3))
    assert own.max() < 0.5
    plain = torch.nn.functional.cosine_similarity(teacher.roll(1, 0), teacher, dim=-1).mean(0)
    assert plain.min() > 0.99  # what the plain cosine says of the same wrong student
    own, other = centred_cosines(teacher[:1], teacher[:1], center)
    assert torch.isnan(other).all() and not torch.isnan(own).any()  # one record: no other to compare with


def test_stage2_logs_the_centred_cosines_per_position(tiny_dir, data_dir, tmp_path):
    from lcot.precompute_teacher_latents import main as precompute_main

    jsonl = str(data_dir / "train.jsonl")
    precompute_main(["--model_name_or_path", str(tiny_dir), "--train_jsonl", jsonl, "--output_dir",
                     str(tmp_path / "teacher"), "--k_max", "3", "--bsz", "8", "--benefit_records", "0"])
    train.main(["--stage", "stage2", "--model_name_or_path", str(tiny_dir), "--output_dir", str(tmp_path / "s2"),
                "--train_jsonl", jsonl, "--teacher_latent_dir", str(tmp_path / "teacher"), "--latent_size", "3",
                "--bsz", "4", "--grad_accum_steps", "1", "--max_steps", "2", "--logging_steps", "1",
                "--warmup_steps", "0", "--report_to", "tensorboard", "--seed", "0"])
    rows = read_metrics(tmp_path / "s2")
    assert len(rows) == 2
    for row in rows:
        for name in ("cos", "ccos", "ccos_shuffled"):
            values = row[f"{name}_per_position"]
            assert len(values) == 3 and all(isinstance(v, float) and -1 <= v <= 1 for v in values), (name, row)
        assert not math.isclose(row["ccos_per_position"][0], row["ccos_shuffled_per_position"][0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "s2").rglob("events.out.tfevents.*")).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ccos_pos1", "train/ccos_shuffled_pos3", "train/cos_pos2"} <= tags, tags
