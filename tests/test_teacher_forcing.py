"""Teacher forcing in stage3 (scheduled sampling): slot j takes the teacher's latent j-1 where forced."""

from __future__ import annotations

import pytest
import torch

from lcot.core.collate import Collator
from lcot.core.model import latent_hidden_states
from lcot.lab.analysis import latent_inputs
from lcot.pipeline import train
from lcot.pipeline.generate import generate_batch
from lcot.pipeline.trainer import teacher_forced


@pytest.mark.parametrize("grad", ["truncated", "bptt:2"])
def test_forced_slots_read_the_given_inputs(loaded, records, grad):
    """Oracle: generation's pass over given latent inputs (one cached multi-token pass), repeated for each bptt
    link. Slot 3 forced to a random vector: slots 1-2 keep their outputs, slot 3's follows the new input; with
    "truncated" the other slots keep the inputs of the unforced chain, each bptt link feeds the forced chain's."""
    model, processor = loaded
    recs, k = records[:2], 4
    b = Collator(processor, model.config, k, thought_images=False)(recs)
    own = latent_inputs(model, processor, recs, k)  # (B, K, H): what each slot is fed without forcing
    given = own.clone()
    given[:, 2] = torch.randn(given[:, 2].shape, generator=torch.Generator().manual_seed(0)) * own.norm(dim=-1).mean()
    forced = torch.zeros(2, k, dtype=torch.bool)
    forced[:, 2] = True
    with torch.no_grad():
        _, plain = latent_hidden_states(model, b, grad)
        _, got = latent_hidden_states(model, dict(b, forced=forced, forced_inputs=given), grad)
    def outputs(inputs):  # the slots' outputs for these inputs
        return torch.stack([g.latents for g in generate_batch(model, processor, recs, k, max_new_tokens=1,
                                                              latent_inputs=inputs)])

    want = outputs(given)
    for _ in range(int(grad.partition(":")[2] or 0)):  # each bptt pass feeds back the last pass's outputs, forced
        fed = torch.cat([own[:, :1], want[:, :k - 1]], 1)
        want = outputs(torch.where(forced[..., None], given, fed))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :2], plain[:, :2], atol=1e-6, rtol=1e-6)
    assert (got[:, 2] - plain[:, 2]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="teacher forcing"):
        latent_hidden_states(model, dict(b, forced=forced, forced_inputs=given), "full")


def test_the_forcing_schedule_anneals_and_never_forces_slot_one():
    first = teacher_forced(0, 0, 100, 1.0, 64, 4)
    assert not first[:, 0].any() and first[:, 1:].all()
    assert torch.equal(teacher_forced(0, 30, 100, 0.8, 64, 4), teacher_forced(0, 30, 100, 0.8, 64, 4))
    rate = teacher_forced(0, 50, 100, 0.8, 2000, 4)[:, 1:].float().mean().item()
    assert abs(rate - 0.4) < 0.03
    assert not teacher_forced(0, 100, 100, 1.0, 64, 4).any()


def test_stage3_trains_with_teacher_forcing_and_refuses_what_cannot_force(tiny_dir, data_dir, tmp_path, capsys):
    from lcot.precompute_teacher_latents import main as precompute_main

    jsonl = str(data_dir / "train.jsonl")
    precompute_main(["--model_name_or_path", str(tiny_dir), "--train_jsonl", jsonl, "--output_dir",
                     str(tmp_path / "teacher"), "--k_max", "3", "--bsz", "8", "--benefit_records", "0"])
    base = ["--stage", "stage3", "--model_name_or_path", str(tiny_dir), "--train_jsonl", jsonl, "--latent_size", "3",
            "--teacher_latent_dir", str(tmp_path / "teacher"), "--bsz", "4", "--grad_accum_steps", "1",
            "--max_steps", "2", "--warmup_steps", "0", "--report_to", "none", "--seed", "0"]
    train.main([*base, "--output_dir", str(tmp_path / "s3"), "--teacher_forcing", "1", "--latent_grad", "truncated"])
    assert (tmp_path / "s3" / "model.safetensors").is_file()
    for flags, message in {("--latent_grad", "full"): "needs --latent_grad truncated or bptt:M, got full",
                           ("--latent_grad", "truncated", "--align_weight", "0"): "feeds the teacher's latents",
                           ("--teacher_forcing", "2"): "must be in [0, 1], got 2.0"}.items():
        argv = [*base, "--output_dir", str(tmp_path / "bad"), "--teacher_forcing", "0.5", *flags]
        with pytest.raises(SystemExit) as exc:
            train.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
