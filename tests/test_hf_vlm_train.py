"""Training transformers vision-language models through `iqa train`'s interface (iqa_cli/models/hf_vlm): each
method lowers its loss, the run directory is a standard transformers checkpoint that scores as the trained model
did, a LoRA run merges to the same scores, and our response CE equals transformers' own `labels=` loss.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli.constants import DEFAULT_QUESTION, IGNORE_INDEX
from iqa_cli.losses import response_cross_entropy
from iqa_cli.models.backbone import TrainableBackbone, load_backbone
from iqa_cli.models.hf_vlm.tiny import TINY_FAMILIES, tiny_checkpoint
from iqa_cli.scoring.scorer import Scorer
from tests.conftest import run_iqa
from tests.test_train_data import prepare_synthetic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2-VL and Idefics3, and 6 synthetic images (5 train, 1 test) prepared by `iqa prepare custom`."""
    root = tmp_path_factory.mktemp("hf_vlm_train")
    models = {family: tiny_checkpoint(family, root / family) for family in ("qwen2_vl", "idefics3")}
    return models, prepare_synthetic(root, "synth", 6, size=(40, 32))


def _train(setup, tmp_path, method, *, family="qwen2_vl", steps=6, **options):
    from iqa_cli.training import TrainConfig, train

    models, data = setup
    out = tmp_path / f"run-{method}"
    config = TrainConfig.from_options(
        datasets=["synth"], data_dir=data, model=str(models[family]), out=out, method=method, epochs=steps,
        max_steps=steps, batch_size=5, lr=2e-3, workers=0, quiet=True, fixed_question=True, **options,
    )  # fmt: skip
    result = train(config)
    losses = [json.loads(line).get("loss") for line in (out / "train_log.jsonl").read_text().splitlines()]
    return out, result, [x for x in losses if x is not None]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "lora"), [("deqa", False), ("qalign", True), ("qscorer", True)])
def test_each_method_lowers_its_loss_and_the_run_scores_as_trained(setup, tmp_path, method, lora):
    options = {"lora": True, "lora_r": 8, "lora_alpha": 16, "merge": True} if lora else {}
    if method == "qscorer":  # unclamped MSE: a tiny random model's first outputs may fall below the clamp's 0
        options |= {"mlp_dims": [16, 16], "mse_clamp": False}
    options |= {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4}  # native resolution, small: 1 to 4 tokens
    out, result, losses = _train(setup, tmp_path, method, **options)
    assert result.steps == 6 and len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0], losses  # all five training images every step: the loss goes down
    run = json.loads((out / "iqa.json").read_text())
    assert run["family"] == "qwen2_vl" and run["method"] == method
    if lora:
        assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
        assert run["base"] == str(setup[0]["qwen2_vl"].resolve())
    else:  # a standard transformers checkpoint: transformers' own Auto classes load it
        from transformers import AutoModelForImageTextToText, AutoProcessor

        AutoModelForImageTextToText.from_pretrained(out)
        AutoProcessor.from_pretrained(out)
    images = [Image.open(p).convert("RGB") for p in sorted((setup[1].parent / "synth-src" / "images").glob("*"))[:3]]
    scored = Scorer.from_pretrained(out, device="cpu", dtype="float32")
    trained_size = {"size": {"shortest_edge": 784, "longest_edge": 3136}}
    assert scored.backbone.images_kwargs == trained_size  # scored at the pixel budget it was trained with
    if method == "qscorer":
        assert scored.readout.level_names == ("bad", "poor", "fair", "good", "excellent")
        assert scored.backbone.tokenizer.convert_ids_to_tokens(list(scored.readout.level_token_ids))[0] == "<score1>"
        assert scored.has_regressor
    results = scored.score(images)
    if lora:  # --merge wrote a full checkpoint that scores the same
        merged_scorer = Scorer.from_pretrained(out / "merged", device="cpu", dtype="float32")
        assert merged_scorer.backbone.images_kwargs == trained_size
        merged = merged_scorer.score(images)
        np.testing.assert_allclose([r.probs for r in merged], [r.probs for r in results], rtol=0, atol=1e-5)
        if method == "qscorer":
            np.testing.assert_allclose([r.score_reg for r in merged], [r.score_reg for r in results], atol=1e-5)
    else:  # the trained weights moved away from the base's scores
        base = Scorer.from_pretrained(
            setup[0]["qwen2_vl"], device="cpu", dtype="float32", min_pixels=784, max_pixels=3136
        )
        base = base.score(images)
        assert not np.allclose([r.probs for r in base], [r.probs for r in results], atol=1e-4)


def test_save_load_round_trip_keeps_scores_and_the_regressor(setup, tmp_path):
    backbone = load_backbone(setup[0]["qwen2_vl"], dtype=torch.float32, device="cpu")
    assert isinstance(backbone, TrainableBackbone)
    ids = backbone.add_tokens(["<score1>", "<score2>"])
    backbone.record_score_tokens(ids)
    backbone.add_regressor([16, 16])
    with torch.no_grad():
        backbone.model.get_output_embeddings().weight[ids] += 1.0  # rows the resize added, now trained
    (tmp_path / "iqa.json").write_text("{}")
    backbone.save(tmp_path)
    (tmp_path / "iqa.json").write_text(json.dumps({"level_tokens": ["<score1>", "<score2>"], "regressor": "last"}))
    again = load_backbone(tmp_path, dtype=torch.float32, device="cpu")
    item = backbone.transform(Image.new("RGB", (50, 30), (200, 40, 10)))
    prompt = torch.tensor([backbone.encode_prompt(backbone.default_prompt)])
    for b in (backbone, again):
        assert b.level_token_ids(["<score1>", "<score2>"]) == ids
    first = backbone.forward(backbone.collate([item], 1, torch.float32), prompt)
    second = again.forward(again.collate([item], 1, torch.float32), prompt)
    torch.testing.assert_close(second.logits, first.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        again.regress(second.hidden_states[:, -1]), backbone.regress(first.hidden_states[:, -1]), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_response_ce_equals_transformers_own_labels_loss(setup, family):
    """One conversation: our CE over the response (level token included, as Q-Align trains) equals
    `model(**processor(text=conversation, images=[image]), labels=...).loss` with the same tokens supervised."""
    backbone = load_backbone(setup[0][family], dtype=torch.float32, device="cpu")
    level_id = backbone.level_token_id("good")
    ids, labels, level_pos = backbone.encode_training(DEFAULT_QUESTION, "good", level_id, image_first=False)
    assert ids[level_pos] == level_id and labels[level_pos] == level_id
    assert ids[:level_pos] == backbone.encode_prompt(backbone.default_prompt)  # scoring reads where training taught
    image = Image.new("RGB", (60, 40), (30, 120, 200))
    visual = backbone.collate([backbone.transform(image)], 1, torch.float32)
    ids_t, labels_t = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        logits, _ = backbone.training_forward(backbone.model, visual, ids_t, torch.ones_like(ids_t))
    ours = response_cross_entropy(logits, labels_t)

    text = backbone.tokenizer.decode(ids)
    inputs = backbone.processor(text=[text], images=[image], return_tensors="pt", **backbone.images_kwargs)
    _, text_pos, _ = backbone._splice(visual, ids_t, None)
    is_text = ids_t[0] != backbone.image_token_id
    assert torch.equal(inputs["input_ids"][0, text_pos[0][is_text]], ids_t[0][is_text])  # our splice = the processor's
    full = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
    full[0, text_pos[0]] = labels_t[0]
    with torch.no_grad():
        theirs = backbone.model(**inputs, labels=full).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_after_a_crash_and_fsdp2_equal_the_plain_run(setup, tmp_path, monkeypatch):
    """Full tuning (Q-Align: no pairs, half the images of DeQA's), 4 steps: a run that crashes after step 3 (last
    save at step 2) resumes to the uninterrupted run's weights and log; FSDP2 (decoder layers as units, one
    process) gives the same losses and weights."""
    from safetensors.torch import load_file

    from iqa_cli.training import TrainConfig, train
    from tests.test_train_run import _log, _train_until_crash

    models, data = setup

    def config(name, **extra):
        return TrainConfig.from_options(
            datasets=["synth"], data_dir=data, model=str(models["qwen2_vl"]), out=tmp_path / name, method="qalign",
            epochs=4, max_steps=4, batch_size=5, lr=1e-3, workers=0, quiet=True, save_every=2, evaluate=False,
            min_pixels=784, max_pixels=3136, **extra,
        )  # fmt: skip

    whole = config("whole")
    train(whole)
    broken = config("broken")
    _train_until_crash(monkeypatch, broken, step=3)
    resumed = train(broken)
    assert resumed.resumed_from == 2
    assert _log(whole.out) == _log(broken.out)
    a, b = load_file(str(whole.out / "model.safetensors")), load_file(str(broken.out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)

    sharded = config("fsdp", strategy="fsdp")
    train(sharded)
    losses = [[r["loss"] for r in _log(run.out) if "loss" in r] for run in (whole, sharded)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    c = load_file(str(sharded.out / "model.safetensors"))
    assert sorted(c) == sorted(a)
    for key in a:
        torch.testing.assert_close(c[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_qscorer_score_tokens_work_on_every_family(tmp_path_factory, family):
    """Added <scoreN> tokens are one id each, read after the scoring prompt, and trained at their position."""
    directory = tiny_checkpoint(family, tmp_path_factory.mktemp("qscorer") / family)
    backbone = load_backbone(directory, dtype=torch.float32, device="cpu")
    tokens = [f"<score{i}>" for i in range(1, 6)]
    ids = backbone.add_tokens(tokens)
    assert len(set(ids)) == 5 and backbone.level_token_ids(tokens) == ids and max(ids) < backbone.vocab_size
    enc_ids, labels, pos = backbone.encode_training(DEFAULT_QUESTION, "<score3>", ids[2], image_first=False)
    assert enc_ids[pos] == labels[pos] == ids[2]
    prompt = backbone.encode_prompt(backbone.default_prompt)  # before a special token, " " is a token of its own:
    assert enc_ids[: len(prompt)] == prompt and pos - len(prompt) <= 1  # scoring reads after enc_ids[:pos] (iqa.json)
    visual = backbone.collate([backbone.transform(Image.new("RGB", (40, 30)))], 1, torch.float32)
    ids_t = torch.tensor([enc_ids])
    logits, hidden = backbone.training_forward(
        backbone.model, visual, ids_t, torch.ones_like(ids_t), torch.tensor([pos - 1])
    )
    assert logits.shape == (1, len(enc_ids), backbone.vocab_size) and hidden.shape == (
        1,
        backbone.model.config.get_text_config().hidden_size,
    )
    ours = backbone.forward(visual, torch.tensor([enc_ids[:pos]])).logits[0, -1]
    torch.testing.assert_close(logits[0, pos - 1], ours, rtol=0, atol=1e-5)  # training reads where scoring does


def test_iqa_train_refuses_a_level_word_of_several_tokens(setup, tmp_path):
    models, _ = setup
    data = prepare_synthetic(tmp_path, "words", 6, size=(40, 32), extra=("--level-names", "bad,poor,fair,good,superb"))
    model, out = str(models["qwen2_vl"]), str(tmp_path / "run")
    result = run_iqa("train", "--datasets", "words", "--data-dir", str(data), "--model", model, "--out", out,
                     "--epochs", "1", "--batch-size", "2", "--workers", "0", "-q")  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "level word 'superb' is" in lines[0] and "tokens" in lines[0], result.stderr
    assert not (tmp_path / "run" / "iqa.json").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_what_one_process_trains(setup, tmp_path):
    """DDP with LoRA over two ranks: the global batch split in two gives one process's losses and adapter (all
    images one size and a fixed question, so every rank's token-mean CE averages the same number of tokens)."""
    from safetensors.torch import load_file

    from tests.test_train_run import _log, _torchrun

    models, data = setup
    flags = ["--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--fixed-question", "--no-eval",
             "-q", "--datasets", "synth", "--data-dir", str(data), "--model", str(models["qwen2_vl"]), "--lora",
             "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--min-pixels", "784",
             "--max-pixels", "3136"]  # fmt: skip
    single = run_iqa("train", *flags, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = _torchrun("train", *flags, "--out", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    losses = [[r["loss"] for r in _log(tmp_path / run) if "loss" in r] for run in ("one", "two")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for name in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert sorted(one) == sorted(two)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)


def test_pixel_bounds_are_refused_for_a_family_without_them(tmp_path):
    from iqa_cli.errors import UserError
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "mplug", image_size=28)
    with pytest.raises(UserError, match=r"^--max-pixels does not apply to mplug_owl2 models$"):
        load_backbone(model, device="cpu", max_pixels=448 * 448)
