"""Per-step supervision: latent slot j learns the first token of the state after step j (--state_weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcot.core.collate import Collator
from lcot.core.loss import state_loss
from lcot.core.tokens import IGNORE
from lcot.pipeline import train
from lcot.pipeline.data import read_records
from lcot.pipeline.runs import read_metrics
from lcot.pipeline.trainer import TrainCollate
from lcot.toy.synthetic import generate


@pytest.fixture(scope="module")
def hops_jsonl(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("hops") / "data", n=30, seed=1, task="hops")["train"]


def test_state_targets_are_each_steps_first_token_then_the_last(loaded, hops_jsonl):
    model, processor = loaded
    tc = TrainCollate(Collator(processor, model.config, 4, thought_images=False), None, 128, state_field="states")
    recs = read_records(hops_jsonl)
    tok = processor.tokenizer
    for rec in recs:
        first = [tok(s, add_special_tokens=False)["input_ids"][0] for s in rec.extra["states"]]
        assert tc.state_targets(rec) == (first + [first[-1]] * 4)[:4]
    assert tc(recs[:3])["state_targets"].shape == (3, 4)
    rec = recs[0]
    rec.extra.pop("states")
    assert tc.state_targets(rec) == [IGNORE] * 4


def test_state_loss_is_the_ce_of_the_slots_logits():
    head = torch.nn.Linear(8, 5, bias=False)
    latents, targets = torch.randn(2, 3, 8), torch.tensor([[1, 2, IGNORE], [0, 4, 4]])
    want = F.cross_entropy(head(latents).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(state_loss(head, latents, torch.cat([targets, targets[:, :1]], 1)), want)


def test_stage3_trains_with_state_supervision_and_refuses_a_missing_field(tiny_dir, hops_jsonl, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_dir), "--train_jsonl", str(hops_jsonl), "--latent_size", "3",
            "--align_weight", "0", "--bsz", "4", "--grad_accum_steps", "1", "--max_steps", "2", "--logging_steps",
            "1", "--warmup_steps", "0", "--report_to", "none", "--state_weight", "1"]
    train.main(["--stage", "stage3", *base, "--output_dir", str(tmp_path / "s3"), "--state_field", "states"])
    rows = read_metrics(tmp_path / "s3")
    assert len(rows) == 2 and all(r["state_ce"] > 0 and r["loss"] > r["ce"] for r in rows)
    for flags, message in {("--stage", "stage3"): "needs --state_field",
                           ("--stage", "stage3", "--state_field", "nope"): "no record has the field 'nope'",
                           ("--stage", "vcot", "--state_field", "states"): "not in vcot"}.items():
        with pytest.raises(SystemExit) as exc:
            train.main([*base, *flags, "--output_dir", str(tmp_path / "bad")])
        assert exc.value.code == 2 and message in capsys.readouterr().err
