"""The training pipeline end to end on the tiny model: CLI stages, teacher files, generation, resume."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from lcot.core.collate import Collator
from lcot.core.loss import align_loss
from lcot.core.model import latent_hidden_states
from lcot.pipeline import train as cli
from lcot.pipeline.data import read_records
from lcot.pipeline.generate import generate, generate_batch
from lcot.pipeline.generate import main as generate_main
from lcot.pipeline.load import load
from lcot.pipeline.runs import read_metrics
from lcot.pipeline.teacher import read_teacher, teacher_file
from lcot.pipeline.trainer import LatentTrainer, TrainCollate, TrainConfig, sample_k
from lcot.precompute_teacher_latents import main as precompute_main

K, KMAX = 3, 4
FAST = ["--bsz", "8", "--grad_accum_steps", "1", "--learning_rate", "3e-3", "--logging_steps", "1",
        "--save_steps", "1000",
        "--seed", "0", "--warmup_steps", "0"]
FORMAT = re.compile(r"^<abs_vis_token>(<abs_vis_token_pad>)+</abs_vis_token>\n.+", re.S)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir, data_dir):
    """stage1 -> teacher -> stage2 -> stage3 through the CLI entry points, once for this module."""
    run = tmp_path_factory.mktemp("chain")
    train = str(data_dir / "train.jsonl")
    base = ["--train_jsonl", train, *FAST]
    cli.main(["--stage", "stage1", "--model_name_or_path", str(tiny_dir), "--output_dir", str(run / "s1"),
              "--latent_size", str(K), "--max_steps", "40", *base])
    precompute_main(["--model_name_or_path", str(run / "s1"), "--train_jsonl", train,
                     "--output_dir", str(run / "teacher"), "--k_max", str(KMAX), "--bsz", "8"])
    teacher = ["--teacher_latent_dir", str(run / "teacher"), "--align_weight", "1.0"]
    cli.main(["--stage", "stage2", "--model_name_or_path", str(run / "s1"), "--output_dir", str(run / "s2"),
              "--latent_size", str(K), "--max_steps", "6", *teacher, *base])
    cli.main(["--stage", "stage3", "--model_name_or_path", str(run / "s2"), "--output_dir", str(run / "s3"),
              "--latent_size", str(KMAX), "--max_steps", "8", *teacher, *base])
    return run


def test_every_stage_writes_a_reloadable_hf_checkpoint(chain, tiny_dir):
    tiny_sd = load_file(tiny_dir / "model.safetensors")
    for stage in ("s1", "s2", "s3"):
        folder = chain / stage
        info = json.loads((folder / "lcot.json").read_text())
        assert info["stage"] == {"s1": "stage1", "s2": "stage2", "s3": "stage3"}[stage]
        assert info["tokens"] == {"start": "<abs_vis_token>", "end": "</abs_vis_token>", "pad": "<abs_vis_token_pad>"}
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)  # plain transformers loads it
        _, processor = load(folder)
        assert processor.tokenizer.convert_tokens_to_ids("<abs_vis_token_pad>") is not None
        assert stock.config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
        sd = load_file(folder / "model.safetensors")
        key = next(k for k in sd if k.endswith("layers.0.mlp.up_proj.weight") and "visual" not in k)
        assert not torch.equal(sd[key], tiny_sd[key])  # it really trained
    # the input folder was never written to
    assert not (tiny_dir / "lcot.json").exists()


def test_teacher_files_have_the_contract_names_and_shapes(chain, records):
    for rec in records:
        path = chain / "teacher" / f"latent_last_layer_jsonl_{rec.idx:06d}.pt"
        assert path == teacher_file(chain / "teacher", rec.idx)
        data = torch.load(path, weights_only=True)
        assert data["latents"].shape == (KMAX, 128) and data["latents"].dtype == torch.float32
        assert data["k_max"] == KMAX and data["record_digest"] == rec.digest and data["idx"] == rec.idx
        assert torch.isfinite(data["latents"]).all()


def test_generation_answers_in_the_latent_format(chain, data_dir, capsys):
    model, processor = load(chain / "s3")
    test = read_records(data_dir / "test.jsonl")
    gens = generate(model.eval(), processor, test, num_latents=KMAX, batch_size=4, max_new_tokens=6, progress=False)
    assert len(gens) == len(test)
    hidden = model.config.text_config.hidden_size
    for g in gens:
        assert FORMAT.match(g.text), g.text
        assert g.latents.shape == (KMAX, hidden) and torch.isfinite(g.latents).all()  # K states really computed
        assert not torch.allclose(g.latents[0], g.latents[-1])  # each fed back, not one state repeated
    generate_main(["--model_name_or_path", str(chain / "s3"), "--jsonl", str(data_dir / "test.jsonl"),
                   "--max_new_tokens", "6", "--raw"])  # the decoded text, every latent token spelled out
    parts = re.split(r"^\[(\d+)\] ", capsys.readouterr().out, flags=re.M)[1:]  # idx, output, idx, output...
    assert [int(i) for i in parts[::2]] == [r.idx for r in test]
    # the CLI's default K is the trained Kmax: its outputs are those of generate() at K=Kmax
    assert [p.rstrip("\n") for p in parts[1::2]] == [g.text for g in gens]


def test_generation_latents_equal_training_latents(chain, records):
    model, processor = load(chain / "s3")
    model.eval()
    recs = records[:3]
    for k in (1, KMAX):
        batch = Collator(processor, model.config, k, thought_images=False)(recs)
        with torch.no_grad():
            _, train_latents = latent_hidden_states(model, batch)
        gens = generate_batch(model, processor, recs, k, max_new_tokens=2)
        for i, g in enumerate(gens):
            torch.testing.assert_close(g.latents, train_latents[i], atol=1e-5, rtol=1e-5)


def test_stage3_samples_the_documented_k_sequence(chain):
    rows = read_metrics(chain / "s3")
    assert [r["step"] for r in rows] == list(range(1, 9))
    ks = [int(r["k"]) for r in rows]
    assert len(set(ks)) > 1 and all(1 <= k <= KMAX for k in ks)
    for r in rows:  # the logged K is the number of latents the model produced: cosines exist for those slots only
        cos = r["cos_per_position"]
        assert len(cos) == KMAX and sum(c is not None for c in cos) == int(r["k"])
        assert all(c is not None for c in cos[: int(r["k"])])


def test_stage3_k_draws_are_uniform_and_reproducible():
    draws = [sample_k(0, step, KMAX) for step in range(4000)]
    for k in range(1, KMAX + 1):  # uniform in 1..Kmax: each within 15% of its share
        assert abs(draws.count(k) / 4000 - 1 / KMAX) < 0.15 / KMAX, (k, draws.count(k))
    assert draws == [sample_k(0, step, KMAX) for step in range(4000)]  # a resumed run draws the same K
    assert draws[:50] != [sample_k(1, step, KMAX) for step in range(50)]  # the seed matters


def test_stage3_loss_aligns_to_the_first_k_teacher_latents(chain, records, tmp_path):
    model, processor = load(chain / "s2")
    model.eval()
    cfg = TrainConfig(stage="stage3", model_name_or_path=str(chain / "s2"), train_jsonl="-", output_dir=str(tmp_path),
                      num_latents=KMAX, align_weight=0.7, seed=5, report_to="none")
    collate = TrainCollate(Collator(processor, model.config, KMAX, thought_images=False), chain / "teacher", 128)
    trainer = LatentTrainer(model=model, args=cfg, data_collator=collate, train_dataset=records)
    batch = collate(records[:2])
    k = sample_k(5, trainer.state.global_step, KMAX)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        b = dict(batch)
        from lcot.core.collate import drop_latents

        b = drop_latents(b, k)
        out = model(input_ids=b["input_ids"], attention_mask_4d=b["attention_mask_4d"], position_ids=b["position_ids"],
                    pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"], labels=b["labels"],
                    latent_mode=True, latent_start=b["latent_start"], num_latents=k)
        teacher = torch.stack([read_teacher(teacher_file(chain / "teacher", r.idx), r) for r in records[:2]])
        align, _ = align_loss(out.latent_hidden, teacher[:, :k])
        cos = torch.nn.functional.cosine_similarity(out.latent_hidden, teacher[:, :k], dim=-1)
    assert batch["teacher"].shape == (2, KMAX, 128)
    torch.testing.assert_close(align, (1 - cos).mean())
    torch.testing.assert_close(loss, out.loss + 0.7 * align)


def test_stage2_overfits_a_fixed_batch(chain, records):
    """A real optimisation check: CE + alignment on one batch falls by half within 30 steps."""
    model, processor = load(chain / "s1")
    model.train()
    collate = TrainCollate(Collator(processor, model.config, K, thought_images=True), chain / "teacher", 128)
    batch = collate(records[:4])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(input_ids=batch["input_ids"], attention_mask_4d=batch["attention_mask_4d"],
                    position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], labels=batch["labels"], latent_mode=True,
                    latent_start=batch["latent_start"], num_latents=K, return_logits=False)
        align, _ = align_loss(out.latent_hidden, batch["teacher"])
        loss = out.loss + align
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_continues_with_the_same_steps_and_optimizer_state(tiny_dir, data_dir, tmp_path):
    base = ["--stage", "stage1", "--model_name_or_path", str(tiny_dir), "--train_jsonl",
            str(data_dir / "train.jsonl"), "--latent_size", "2", "--max_steps", "4", *FAST, "--save_steps", "2",
            "--save_final_checkpoint"]  # checkpoint-4 too: its trainer_state.json holds the whole loss history
    cli.main([*base, "--output_dir", str(tmp_path / "full")])
    # a run that stopped after step 2: only its checkpoint-2 survives; resume it in a new folder
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    state = json.loads((tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    cli.main([*base, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint"])
    final = json.loads((tmp_path / "cut" / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["global_step"] == 4
    assert [r["loss"] for r in final["log_history"] if "loss" in r] == [
        r["loss"] for r in json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())[
            "log_history"] if "loss" in r]
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "cut" / "model.safetensors")
    for key in full:  # identical weights need the restored Adam moments and LR schedule
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=1e-5)


def flag_problems(cls, parser) -> dict[str, str]:
    """The fields of the config dataclass `cls` that its command's parser leaves unexplained or misstated, by
    name: no help; a default written into the help by hand (it goes stale: lcot.config appends the real one); a
    --help that does not end with the dataclass's default; or a parsed default other than the dataclass's
    (argparse runs a str default through the flag's type: a float field defaulting to "1e-3" parses to 0.001
    while a Python caller gets the string)."""
    import dataclasses

    actions = {a.dest: a for a in parser._actions}
    formatter = parser._get_formatter()
    argv = []  # a value for each required flag, so that the parser can run
    for a in parser._actions:
        if a.required:
            argv += [a.option_strings[0], str(a.choices[0]) if a.choices else "1" if a.type in (int, float) else "x"]
    parsed = vars(parser.parse_args(argv))
    problems = {}
    for f in dataclasses.fields(cls):
        action = actions.get(f.name)
        if action is None:
            problems[f.name] = "no flag"
            continue
        own = f.metadata.get("help", "")
        if not own.strip():
            problems[f.name] = "no help"
        elif "(default" in own:
            problems[f.name] = f"a default written by hand: {own!r}"
        if action.required:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (" ".join(map(str, default)) or "none") if isinstance(default, list) else default
        shown = '""' if shown == "" else str(shown)
        helped = formatter._expand_help(action)  # what --help prints for it (% unescaped)
        if not helped.endswith(f"(default: {shown})"):
            problems[f.name] = f"--help says {helped!r}, the dataclass {default!r}"
        if parsed[f.name] != default:
            problems[f.name] = f"parses to {parsed[f.name]!r} by default, the dataclass gives {default!r}"
    return problems


def test_every_cli_flag_is_explained_with_its_real_default():
    import dataclasses

    import transformers

    from lcot import config, demo, experiment, precompute_teacher_latents
    from lcot.config import option
    from lcot.pipeline import evaluate, generate
    from lcot.toy import synthetic, tiny

    commands = [(precompute_teacher_latents.PrecomputeConfig, precompute_teacher_latents.parser()),
                (evaluate.EvaluateConfig, evaluate.parser()), (experiment.ExperimentConfig, experiment.parser())]
    commands += [(cls, config.parser(cls, "prog")) for cls in (generate.GenerateConfig, experiment.MeasureConfig,
                                                             demo.DemoConfig, synthetic.SyntheticConfig,
                                                             tiny.TinyConfig)]
    for cls, parser in commands:
        assert flag_problems(cls, parser) == {}, cls.__name__
    # lcot.main: the flags lcot defines (those of transformers.TrainingArguments explain themselves)
    hf = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = [a for a in cli.parser()._actions if a.dest != "help" and a.dest not in hf]
    assert len(ours) > 20
    assert [a.dest for a in ours if not (a.help or "").strip()] == []

    @dataclasses.dataclass
    class Planted:  # the check catches each way a flag can go wrong
        path: str = option(help="required, so no default is shown")
        fine: int = option(3, "an explained flag")
        percent: str = option("10%", "a share of the records")
        items: list[int] = option([1, 2], "several values")
        bare: int = option(4)
        stale: int = option(5, "a batch size (default: 6)")
        rate: float = option("1e-3", "a learning rate given as a string")

    problems = flag_problems(Planted, config.parser(Planted, "prog"))
    assert set(problems) == {"bare", "stale", "rate"}, problems
    assert problems["bare"] == "no help" and "by hand" in problems["stale"] and "0.001" in problems["rate"]


def test_precompute_keeps_valid_files_and_recomputes_for_new_weights(loaded, records, tmp_path):
    import copy

    from lcot.pipeline.teacher import precompute

    model, processor = loaded
    recs = records[:2]
    assert precompute(model, processor, recs, tmp_path, 2, progress=False)["computed"] == 2
    first = torch.load(teacher_file(tmp_path, recs[0].idx), weights_only=True)
    assert precompute(model, processor, recs, tmp_path, 2, progress=False) == {"records": 2, "computed": 0, "kept": 2}
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.model.language_model.norm.weight.mul_(1.5)
    assert precompute(retrained, processor, recs, tmp_path, 2, progress=False)["computed"] == 2
    second = torch.load(teacher_file(tmp_path, recs[0].idx), weights_only=True)
    assert second["model_fingerprint"] != first["model_fingerprint"]
    assert not torch.allclose(second["latents"], first["latents"])


def test_warmup_steps_below_one_is_a_ratio_and_the_default_is_lcots():
    """--warmup_steps below 1 is a fraction of the steps (transformers 5); lcot's default is 0.03 (the Trainer's:
    0)."""
    cfg = TrainConfig(stage="stage1", model_name_or_path="m", train_jsonl="t", output_dir="o", warmup_steps=0.1)
    assert cfg.get_warmup_steps(200) == 20
    cfg = cli.parse(["--stage", "stage1", "--model_name_or_path", "m", "--train_jsonl", "t", "--output_dir", "o"])
    assert cfg.warmup_steps == 0.03 and cfg.get_warmup_steps(1000) == 30 and cfg.learning_rate == 1e-5


def test_precompute_batches_records_of_one_shape_with_the_same_files(loaded, records, tmp_path):
    """Batches are formed by shape (image sizes, question length): fewer padded tokens than in file order, and
    the files equal those computed one record at a time; DataLoader workers give the very same bytes."""
    import dataclasses

    from PIL import Image

    from lcot.pipeline.teacher import batches_by_shape, precompute, shape_key

    model, processor = loaded
    big = tmp_path / "big.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(big)
    recs = [dataclasses.replace(r, thought_images=(big,) + r.thought_images) if i % 2 else r
            for i, r in enumerate(records[:8])]  # two shapes, alternating in file order
    batches = batches_by_shape(recs, 4)
    assert sorted(r.idx for b in batches for r in b) == sorted(r.idx for r in recs)
    assert all(len({shape_key(r)[:2] for r in b}) == 1 for b in batches)  # one image layout per batch
    collate = Collator(processor, model.config, 2, thought_images=True)

    def padding(groups) -> int:
        return sum(int((collate(g)["segments"] == 0).sum()) for g in groups)

    assert padding(batches) < padding([recs[:4], recs[4:]])
    one = precompute(model, processor, recs, tmp_path / "one", 2, batch_size=1, progress=False)
    four = precompute(model, processor, recs, tmp_path / "four", 2, batch_size=4, progress=False)
    workers = precompute(model, processor, recs, tmp_path / "workers", 2, batch_size=4, progress=False,
                         num_workers=2)
    assert one["computed"] == four["computed"] == workers["computed"] == 8
    for r in recs:
        a, b, c = (torch.load(teacher_file(tmp_path / d, r.idx), weights_only=True)["latents"]
                   for d in ("one", "four", "workers"))
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        assert torch.equal(c, b)


def test_metrics_are_read_back_once_per_optimizer_step(loaded, records, tmp_path):
    """compute_loss keeps its metrics on the device; the gradient-norm hook reads them all (and the norm, also a
    DTensor under FSDP2) in one copy."""
    model, processor = loaded
    cfg = TrainConfig(stage="stage2", model_name_or_path="-", train_jsonl="-", output_dir=str(tmp_path),
                      num_latents=2, align_weight=0.0, latent_grad="truncated", report_to="none")
    collate = TrainCollate(Collator(processor, model.config, 2, thought_images=True), None, 128)
    trainer = LatentTrainer(model=model, args=cfg, data_collator=collate, train_dataset=records)
    with torch.no_grad():
        losses = [float(trainer.compute_loss(model, collate(records[i:i + 2]))) for i in (0, 2)]
    assert trainer._count == 0 and len(trainer._pending) == 2  # nothing read back yet

    class DTensorLike(torch.Tensor):  # like a DTensor, it does not mix with plain tensors
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is not torch.Tensor.as_subclass:
                raise TypeError(f"{func} on a DTensor-like value: call full_tensor() first")
            return super().__torch_function__(func, types, args, kwargs or {})

        def full_tensor(self) -> torch.Tensor:
            return self.as_subclass(torch.Tensor)

    assert trainer._read_metrics(torch.tensor(2.5).as_subclass(DTensorLike)) == 2.5
    assert trainer._count == 2 and not trainer._pending
    assert trainer._sums["ce"] == pytest.approx(sum(losses)) and trainer._sums["k"] == 4.0
    assert trainer._read_metrics(None) == 0.0 and trainer._count == 2
