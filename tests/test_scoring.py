"""The Scorer API: level readout, Q-Scorer regression readout, run-file readouts, against direct computations."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.models.mplug_owl2.model import MPLUGOwl2ForCausalLM
from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
from iqa_cli.models.mplug_owl2.tokenizer import DEFAULT_PROMPT, QUICKSTART_PROMPT, LlamaTokenizer, tokenize_prompt
from iqa_cli.scoring.scorer import Scorer, resolve_dtype
from tests.factories import tiny_model, write_checkpoint

LEVELS = ["bad", "poor", "fair", "good", "excellent"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40), (33, 33), (64, 20)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _expected_levels(model: MPLUGOwl2ForCausalLM, ids: list[int], pixels: torch.Tensor, level_ids: list[int]):
    """Float64 readout from the full logits of an unbatched forward pass, one image at a time."""
    rows = []
    for i in range(pixels.shape[0]):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), pixels[i : i + 1], logits_at="all").logits[0, -1]
        z = logits[level_ids].double().numpy()
        p = np.exp(z - z.max())
        p /= p.sum()
        c = np.linspace(1, 5, len(level_ids))
        mean = (p * c).sum()
        rows.append((p, mean, np.sqrt((p * (c - mean) ** 2).sum())))
    return rows


def test_level_readout_matches_direct_forward(tmp_path, tiny_tokenizer, images):
    model = tiny_model(seed=3)
    ckpt = write_checkpoint(model, tmp_path / "m", tokenizer_dir=tiny_tokenizer)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    tok = LlamaTokenizer.from_dir(tiny_tokenizer)
    ids = tokenize_prompt(tok, DEFAULT_PROMPT)
    level_ids = [tok.encode(w, add_bos=True)[1] for w in LEVELS]
    assert list(scorer.readout.input_ids) == ids
    assert list(scorer.readout.level_token_ids) == level_ids

    pixels = torch.stack([scorer.preprocessor(im) for im in images])
    batch = scorer.score_pixels(pixels)
    for (p, mean, std), got_p, got_mean, got_std in zip(
        _expected_levels(model, ids, pixels, level_ids), batch.probs, batch.score, batch.std, strict=True
    ):
        np.testing.assert_allclose(got_p.numpy(), p, atol=1e-6)
        assert got_mean.item() == pytest.approx(mean, abs=1e-5)
        assert got_std.item() == pytest.approx(std, abs=1e-5)
    assert batch.score_reg is None
    assert not scorer.has_regressor

    results = scorer.score(images, batch_size=3)
    assert [r.score for r in results] == pytest.approx(batch.score.tolist(), abs=1e-6)
    assert [(r.width, r.height) for r in results] == [im.size for im in images]
    assert results[0].level == LEVELS[int(batch.probs[0].argmax())]
    meta = scorer.metadata
    assert json.loads(meta["level_names"]) == LEVELS
    assert meta["prompt"] == DEFAULT_PROMPT
    assert meta["dtype"] == "float32"


def test_scores_do_not_depend_on_batch_composition(tmp_path, tiny_tokenizer, images):
    ckpt = write_checkpoint(tiny_model(seed=4), tmp_path / "m", tokenizer_dir=tiny_tokenizer)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    pixels = torch.stack([scorer.preprocessor(im) for im in images])
    together = scorer.score_pixels(pixels).score
    alone = torch.cat([scorer.score_pixels(pixels[i : i + 1]).score for i in range(len(images))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_custom_prompt_is_used_and_must_hold_one_image_token(tmp_path, tiny_tokenizer):
    ckpt = write_checkpoint(tiny_model(seed=5), tmp_path / "m", tokenizer_dir=tiny_tokenizer)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32", prompt=QUICKSTART_PROMPT)
    tok = LlamaTokenizer.from_dir(tiny_tokenizer)
    assert list(scorer.readout.input_ids) == tokenize_prompt(tok, QUICKSTART_PROMPT)
    with pytest.raises(UserError, match=re.escape("<|image|>")):
        Scorer.from_pretrained(ckpt.path, device="cpu", prompt="USER: rate it ASSISTANT:")


def test_released_qscorer_readout_appends_greedy_token_then_reads_mlp(tmp_path, tiny_tokenizer, images):
    base_vocab = len(LlamaTokenizer.from_dir(tiny_tokenizer))
    model = tiny_model(seed=6, vocab_size=base_vocab + 5, deepmlp_hidden_dims=[48, 48])
    ckpt = write_checkpoint(model, tmp_path / "q", layout="qscorer_lora", tokenizer_dir=tiny_tokenizer)
    scorer = Scorer.from_pretrained(ckpt.path, base=ckpt.base, device="cpu", dtype="float32")
    assert scorer.has_regressor and scorer.readout.regressor == "appended"
    score_ids = list(range(base_vocab, base_vocab + 5))
    assert list(scorer.readout.level_token_ids) == score_ids
    assert scorer.metadata["prompt"] == QUICKSTART_PROMPT

    # Independent: the authors' loop, recomputing the whole sequence with the appended token (no cache).
    merged = scorer.model
    ids = torch.tensor([scorer.readout.input_ids])
    pixels = torch.stack([scorer.preprocessor(im) for im in images])
    batch = scorer.score_pixels(pixels)
    for i in range(len(images)):
        with torch.no_grad():
            first = merged(ids, pixels[i : i + 1], logits_at="all")
            nxt = first.logits[0, -1].argmax()
            second = merged(torch.cat([ids, nxt.view(1, 1)], 1), pixels[i : i + 1], logits_at="all")
            reg = merged.deepmlp(second.hidden_states[:, -1]).item()
            level_logits = (first if nxt.item() in score_ids else second).logits[0, -1, score_ids]
        assert batch.score_reg[i].item() == pytest.approx(reg, abs=1e-5)
        np.testing.assert_allclose(batch.probs[i].numpy(), torch.softmax(level_logits.double(), 0).numpy(), atol=1e-6)


def test_run_file_sets_ids_and_word_levels(tmp_path, tiny_tokenizer, images):
    model = tiny_model(seed=7)
    ckpt = write_checkpoint(model, tmp_path / "run", tokenizer_dir=tiny_tokenizer)
    tok = LlamaTokenizer.from_dir(tiny_tokenizer)
    names = ["one", "two", "three"]
    ids = [*tokenize_prompt(tok, DEFAULT_PROMPT), tok.encode("is", add_bos=False)[0]]
    run = {"method": "deqa", "level_names": names, "level_tokens": names, "input_ids": ids, "prompt": "custom"}
    (ckpt.path / "iqa.json").write_text(json.dumps(run))
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    assert list(scorer.readout.input_ids) == ids
    assert scorer.level_names == names
    pixels = torch.stack([scorer.preprocessor(im) for im in images[:2]])
    batch = scorer.score_pixels(pixels)
    level_ids = [tok.encode(w, add_bos=True)[1] for w in names]
    for i, (p, mean, _std) in enumerate(_expected_levels(model, ids, pixels, level_ids)):
        np.testing.assert_allclose(batch.probs[i].numpy(), p, atol=1e-6)
        assert batch.score[i].item() == pytest.approx(mean, abs=1e-5)
    assert batch.score_reg is None
    assert scorer.metadata["method"] == "deqa"


@pytest.mark.parametrize("k", [3, 5])
def test_run_file_with_score_tokens_reads_regressor_at_last_position(tmp_path, tiny_tokenizer, images, k):
    tok = LlamaTokenizer.from_dir(tiny_tokenizer)
    tokens = [f"<score{i}>" for i in range(1, k + 1)]
    score_ids = tok.add_tokens(tokens)
    saved = tok.save(tmp_path / "tok")
    model = tiny_model(seed=9, vocab_size=len(tok), deepmlp_hidden_dims=[32])
    ckpt = write_checkpoint(model, tmp_path / "run", tokenizer_dir=saved)
    ids = tokenize_prompt(tok, DEFAULT_PROMPT)
    names = LEVELS if k == 5 else ["low", "mid", "high"]
    run = {"method": "qscorer", "level_names": names, "level_tokens": tokens, "input_ids": ids, "regressor": "last"}
    (ckpt.path / "iqa.json").write_text(json.dumps(run))
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    assert list(scorer.readout.level_token_ids) == score_ids
    pixels = torch.stack([scorer.preprocessor(im) for im in images[:2]])
    batch = scorer.score_pixels(pixels)
    for i, (p, _mean, _std) in enumerate(_expected_levels(model, ids, pixels, score_ids)):
        np.testing.assert_allclose(batch.probs[i].numpy(), p, atol=1e-6)
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), pixels[i : i + 1], logits_at="none").hidden_states[0, -1]
        assert batch.score_reg[i].item() == pytest.approx(model.deepmlp(hidden).item(), abs=1e-5)
    assert scorer.metadata["regressor_readout"] == "last"


def test_bad_run_file_is_a_user_error(tmp_path, tiny_tokenizer):
    ckpt = write_checkpoint(tiny_model(seed=8), tmp_path / "run", tokenizer_dir=tiny_tokenizer)
    (ckpt.path / "iqa.json").write_text("{not json")
    with pytest.raises(UserError, match=r"iqa\.json"):
        Scorer.from_pretrained(ckpt.path, device="cpu")


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(UserError, match=r"dtype 'float8': choose auto, float32"):
        resolve_dtype("float8", cpu)


def test_lora_run_directory_names_its_own_base(tmp_path, tiny_tokenizer, images):
    ckpt = write_checkpoint(tiny_model(seed=10), tmp_path / "lora", layout="lora", tokenizer_dir=tiny_tokenizer)
    explicit = Scorer.from_pretrained(ckpt.path, base=ckpt.base, device="cpu", dtype="float32")
    (ckpt.path / "iqa.json").write_text(json.dumps({"base": str(ckpt.base)}))
    implicit = Scorer.from_pretrained(ckpt.path, device="cpu", dtype="float32")
    pixels = torch.stack([explicit.preprocessor(im) for im in images])
    torch.testing.assert_close(implicit.score_pixels(pixels).probs, explicit.score_pixels(pixels).probs)
    assert implicit.metadata["base_model"] == str(ckpt.base.resolve())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uint8_hand_over_gives_the_float_pixels_scores(tmp_path, tiny_tokenizer, images, dtype):
    """The transform's uint8 squares, normalized by the collate into the batch, score exactly as the float
    pixels (`preprocessor(image)`, cast to the model's dtype) do."""
    ckpt = write_checkpoint(tiny_model(seed=2), tmp_path / "m", tokenizer_dir=tiny_tokenizer)
    scorer = Scorer.from_pretrained(ckpt.path, device="cpu", dtype=dtype)
    items = [scorer.transform(im) for im in images]
    assert all(item["pixel_values"].dtype == torch.uint8 for item in items)
    ours = scorer.score_batch(scorer.collate(items, len(items), getattr(torch, dtype)))
    floats = torch.stack([scorer.preprocessor(im) for im in images]).to(getattr(torch, dtype))
    expected = scorer.score_pixels(floats)
    assert torch.equal(ours.probs, expected.probs) and torch.equal(ours.score, expected.score)
    assert torch.equal(ours.std, expected.std)
