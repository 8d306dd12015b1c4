"""Thought visibility end to end: the teacher precompute computes its latents under the very mask the model was
trained with (a visual-CoT warm-up's, with its --thought_visibility), records it, and training on teacher files of
another visibility is refused with the file named."""

from __future__ import annotations

import json

import pytest
import torch

from lcot.core.model import latent_hidden_states
from lcot.pipeline import train
from lcot.pipeline.data import read_records
from lcot.pipeline.load import load
from lcot.pipeline.teacher import teacher_file
from lcot.precompute_teacher_latents import main as precompute_main

K = 3


@pytest.fixture(scope="module")
def warm(tmp_path_factory, tiny_dir, data_dir):
    """A one-step visual-CoT warm-up with stepwise visibility, and its teacher files."""
    run = tmp_path_factory.mktemp("visibility")
    base = ["--train_jsonl", str(data_dir / "train.jsonl"), "--bsz", "4", "--grad_accum_steps", "1", "--seed", "0",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--latent_size", str(K), "--report_to", "none"]
    train.main(["--stage", "vcot", "--model_name_or_path", str(tiny_dir), "--output_dir", str(run / "warm"),
                "--max_steps", "2", "--thought_visibility", "stepwise", *base])
    precompute_main(["--model_name_or_path", str(run / "warm"), "--train_jsonl", str(data_dir / "train.jsonl"),
                     "--output_dir", str(run / "teacher"), "--k_max", str(K), "--bsz", "8", "--benefit_records", "0"])
    return run, base


def test_the_teacher_is_computed_under_the_mask_it_was_trained_with(warm, data_dir):
    run, base = warm
    assert json.loads((run / "warm" / "lcot.json").read_text())["thought_visibility"] == "stepwise"
    records = read_records(data_dir / "train.jsonl")[:4]
    model, processor = load(run / "warm")
    cfg = train.parse(["--stage", "vcot", "--model_name_or_path", str(run / "warm"), "--output_dir", "unused",
                       "--thought_visibility", "stepwise", *base])
    trained = train.stage_collator(cfg, processor, model.config)(records)  # the warm-up's own batch and mask
    assert trained["attention_mask_4d"].any() and trained["num_latents"] == K
    other = train.stage_collator(train.parse([*cfg_argv(run), "--stage", "stage2"]), processor, model.config)(records)
    assert not torch.equal(trained["attention_mask_4d"], other["attention_mask_4d"])  # the answer's rows differ
    s, k = trained["latent_start"], K
    rows = slice(0, s + k)  # ... but under stepwise not the rows up to the slots: <abs_vis_token> reads no image
    assert torch.equal(trained["attention_mask_4d"][:, :, rows], other["attention_mask_4d"][:, :, rows])
    with torch.no_grad():
        _, want = latent_hidden_states(model.eval(), trained)
        _, stage2_mask = latent_hidden_states(model, other)
    torch.testing.assert_close(want, stage2_mask, atol=1e-6, rtol=1e-6)
    for rec, lat in zip(records, want):
        data = torch.load(teacher_file(run / "teacher", rec.idx), weights_only=True)
        assert data["thought_visibility"] == "stepwise" and data["visual_cot"] is True
        torch.testing.assert_close(data["latents"], lat, atol=1e-5, rtol=1e-5)
    # under "all" the warm-up's <abs_vis_token> reads the thought images: the stage2 mask gives other latents,
    # which is why the precompute uses the warm-up's own
    from lcot.core.collate import Collator

    vcot_all = Collator(processor, model.config, K, thought_images=True, visual_cot=True)(records)
    stage2_all = Collator(processor, model.config, K, thought_images=True)(records)
    with torch.no_grad():
        a, b = latent_hidden_states(model, vcot_all)[1], latent_hidden_states(model, stage2_all)[1]
    assert (a - b).abs().max() > 1e-4


def cfg_argv(run) -> list[str]:
    return ["--model_name_or_path", str(run / "warm"), "--output_dir", "unused", "--train_jsonl", "t",
            "--latent_size", str(K), "--thought_visibility", "stepwise"]


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_training_refuses_teacher_files_of_another_visibility(warm, stage, capsys):
    run, base = warm
    with pytest.raises(SystemExit) as exc:
        train.main(["--stage", stage, "--model_name_or_path", str(run / "warm"), "--output_dir", str(run / stage),
                    "--max_steps", "1", "--teacher_latent_dir", str(run / "teacher"), *base])  # visibility: all
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "teacher latents were computed with --thought_visibility stepwise, this run has all" in err
    assert "latent_last_layer_jsonl_" in err and "hint: train with --thought_visibility stepwise" in err
    assert not (run / stage / "model.safetensors").exists()
