"""Scoring reasoning models (iqa_cli/scoring/reasoning.py, hf_vlm/generation.py): greedy answers, the number in the
answer, the digit-probability readout against transformers' own forward, error rows holding the text, and what holds
across runs and batch sizes."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.models.hf_vlm.tiny import tiny_reasoning_checkpoint
from iqa_cli.reasoning import PRESETS
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
from iqa_cli.scoring.scorer import Scorer
from tests.conftest import ONE_THREAD, run_iqa

PIXELS = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 6}  # native sizes: rows of 1 to 6 image tokens
SIZES = [(40, 48), (64, 32), (30, 90), (56, 56), (100, 40), (28, 28), (80, 70), (45, 60)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A chain model (always answers `<think> good </think> <answer> 3 </answer>`), a random one over the small
    vocabulary (answers with and without numbers), and a folder of 8 images of different sizes plus a broken one."""
    root = tmp_path_factory.mktemp("reasoning")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return {
        "chain": tiny_reasoning_checkpoint(root / "chain", answer="3"),
        "random": tiny_reasoning_checkpoint(root / "random", seed=7),  # image-dependent answers, some with no number
        "images": folder,
        "root": root,
    }


def _images(setup):
    return [Image.open(setup["images"] / f"{i}.png").convert("RGB") for i in range(len(SIZES))]


def _scorer(model, **options):
    return Scorer.from_pretrained(
        model, device="cpu", dtype="float32", reasoning="visualquality-r1", **options, **PIXELS
    )


def test_the_digit_readout_equals_a_softmax_of_transformers_own_logits(setup, one_thread):
    """The chain model answers 3; probs are the closed-set softmax of the logits of "1".."5" that transformers'
    own forward gives after the prompt and the answer up to `<answer>` (float64 here)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    scorer = _scorer(setup["chain"], max_new_tokens=12)
    image = _images(setup)[2]
    result = scorer.score([image])[0]
    assert result.reasoning == "<think> good </think> <answer> 3 </answer>" and result.error is None
    assert result.score == 3.0 and result.level == "3"

    processor = AutoProcessor.from_pretrained(setup["chain"])
    model = AutoModelForImageTextToText.from_pretrained(setup["chain"], dtype=torch.float32).eval()
    size = {"shortest_edge": PIXELS["min_pixels"], "longest_edge": PIXELS["max_pixels"]}
    inputs = processor(text=[scorer.readout.prompt], images=[image], return_tensors="pt", images_kwargs={"size": size})
    tokenizer = processor.tokenizer
    prefix = tokenizer.convert_tokens_to_ids(["<think>", "good", "</think>", "<answer>"])
    ids = torch.cat([inputs["input_ids"], torch.tensor([prefix])], 1)
    extra = {"mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 4, dtype=torch.long)], 1)}
    with torch.no_grad():
        logits = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"], **extra,
        ).logits[0, -1]  # fmt: skip
    digits = logits[tokenizer.convert_tokens_to_ids(list("12345"))].double()
    probs = torch.softmax(digits, 0).numpy()
    levels = np.arange(1, 6)
    soft = float(probs @ levels)
    np.testing.assert_allclose(result.probs, probs, rtol=0, atol=1e-5)
    assert result.score_soft == pytest.approx(soft, abs=1e-5)
    assert result.std == pytest.approx(float(np.sqrt(probs @ (levels - soft) ** 2)), abs=1e-5)
    assert int(np.argmax(probs)) == 2  # the greedy answer is the likeliest digit


def test_prompt_ids_and_pixels_are_what_trls_processor_call_gives(setup, tmp_path):
    """GRPO trains through TRL, which renders the same conversation with `apply_chat_template(tokenize=True)` and the
    image processor's defaults (set to the run's pixel budget); scoring reads the same ids and pixels."""
    from trl.data_utils import prepare_multimodal_messages

    from iqa_cli.training.grpo import _load

    scorer = _scorer(setup["chain"], max_new_tokens=4)
    backbone = scorer.backbone
    image = _images(setup)[4]
    visual = backbone.collate([backbone.transform(image)], 1, torch.float32)
    ours, _, _ = backbone._splice(visual, torch.tensor([scorer.readout.input_ids]), None, left=True)

    from iqa_cli.training.config import TrainConfig

    config = TrainConfig.from_options(out=tmp_path, method="grpo", model=str(setup["chain"]), lora=True, **PIXELS)
    trained = _load(config, torch.device("cpu"))
    conversation = prepare_multimodal_messages(PRESETS["visualquality-r1"].messages(), images=[image])
    theirs = trained.processor.apply_chat_template(
        conversation=[conversation], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], rtol=0, atol=0)


def test_batch_sizes_1_and_8_give_the_same_answers_and_a_rerun_the_same_bits(setup, one_thread):
    """The random model: the same texts and numbers whatever the batch; digit probabilities within float32 rounding
    of the CPU kernels for another call shape; the same batch size again gives identical bits."""
    scorer = _scorer(setup["random"], max_new_tokens=6)
    images = _images(setup)
    one = scorer.score(images, batch_size=1)
    eight = scorer.score(images, batch_size=8)
    again = scorer.score(images, batch_size=8)
    assert [r.reasoning for r in one] == [r.reasoning for r in eight]
    assert [r.error for r in one] == [r.error for r in eight]
    parsed = [r for r in one if r.error is None]
    assert 0 < len(parsed) < len(images), [r.reasoning for r in one]  # both kinds of rows are compared
    np.testing.assert_array_equal([r.score for r in one], [r.score for r in eight])  # NaN where no number
    np.testing.assert_allclose([r.probs for r in one], [r.probs for r in eight], rtol=0, atol=1e-5)
    for a, b in zip(eight, again, strict=True):
        assert (a.reasoning, a.error) == (b.reasoning, b.error)
        np.testing.assert_array_equal(
            [a.score, a.std, a.score_soft, *a.probs], [b.score, b.std, b.score_soft, *b.probs]
        )


def test_the_checkpoints_generation_settings_do_not_reach_greedy_decoding(setup, one_thread):
    """A checkpoint's generation_config.json that forbids repeats or suppresses the digits changes nothing: the
    answers are the plain greedy ones (and the model keeps its own settings for other callers)."""
    from transformers import GenerationConfig

    images = _images(setup)
    plain = _scorer(setup["random"], max_new_tokens=6).score(images, batch_size=8)
    scorer = _scorer(setup["random"], max_new_tokens=6)
    model = scorer.backbone.model
    digits = [scorer.backbone.tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    model.generation_config = GenerationConfig(no_repeat_ngram_size=1, suppress_tokens=digits, min_new_tokens=6)
    guarded = scorer.score(images, batch_size=8)
    assert [r.reasoning for r in guarded] == [r.reasoning for r in plain]
    np.testing.assert_array_equal([r.score for r in guarded], [r.score for r in plain])
    assert model.generation_config.no_repeat_ngram_size == 1 and model.generation_config.suppress_tokens == digits


def test_the_column_scorer_of_ray_and_daft_keeps_a_reasoning_models_errors_and_soft_scores(setup, one_thread):
    """RayScorer's and Daft's columns for the random model: an answer without a number is an error row with a null
    score (not a NaN score with a null error), score_soft beside score, the values `Scorer.score` gives."""
    from iqa_cli.engines.columns import ColumnScorer

    options = {"device": "cpu", "dtype": "float32", "batch_size": 8, "reasoning": "visualquality-r1"}
    columns = ColumnScorer(str(setup["random"]), max_new_tokens=6, **options, **PIXELS)
    paths = [str(setup["images"] / f"{i}.png") for i in range(len(SIZES))]
    table = columns.score([*paths, str(setup["images"] / "broken.jpg")]).to_pydict()
    expected = _scorer(setup["random"], max_new_tokens=6).score(_images(setup), batch_size=8)
    assert "score_soft" in table and "reasoning" not in table
    assert table["error"][:-1] == [r.error for r in expected] and table["error"][-1]
    unparsed = [i for i, r in enumerate(expected) if r.error is not None]
    assert 0 < len(unparsed) < len(expected)
    for i, r in enumerate(expected):
        if r.error is None:
            assert table["score"][i] == pytest.approx(r.score, abs=1e-6)
            assert table["score_soft"][i] == pytest.approx(r.score_soft, abs=1e-5)
        else:
            assert table["score"][i] is None and table["score_soft"][i] is None and table["level"][i] is None


def test_iqa_score_reasoning_writes_answers_error_rows_and_resumable_outputs(setup, tmp_path, one_thread):
    """The CLI: the chain model's rows with their text (--keep-reasoning), the broken image an error row; the random
    model's answers without a number are error rows holding the text, and a second run (in process) writes the same
    table."""
    out = tmp_path / "chain.parquet"
    flags = ["--device", "cpu", "--workers", "0", "--quiet", "--min-pixels", "784", "--max-pixels", "4704"]
    result = run_iqa(
        "score", str(setup["images"]), "--model", str(setup["chain"]), "--reasoning", "visualquality-r1",
        "--max-new-tokens", "12", "--keep-reasoning", "--out", str(out), *flags, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out).set_index("image")
    assert list(frame.columns) == [
        "score", "std", "probs", "level", "width", "height", "error", "score_soft", "reasoning"
    ]  # fmt: skip
    good = frame.drop(index="broken.jpg")
    assert good["error"].isna().all() and (good["score"] == 3.0).all() and (good["level"] == "3").all()
    assert (good["reasoning"] == "<think> good </think> <answer> 3 </answer>").all()
    assert frame.loc["broken.jpg", "error"] and pd.isna(frame.loc["broken.jpg", "reasoning"])
    import pyarrow.parquet as pq

    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert metadata["reasoning_preset"] == "visualquality-r1" and metadata["max_new_tokens"] == "12"
    assert metadata["method"] == "reasoning" and json.loads(metadata["level_names"]) == list("12345")

    def run(name, keep_reasoning=True):
        config = ScoreConfig(
            out=tmp_path / name, inputs=[str(setup["images"])], device="cpu", workers=0, quiet=True, batch_size=8,
            keep_reasoning=keep_reasoning,
        )  # fmt: skip
        config.model = config.model.__class__(
            str(setup["random"]), reasoning="visualquality-r1", max_new_tokens=6, dtype="float32", family=PIXELS
        )
        score_images(config)
        return pd.read_parquet(tmp_path / name).set_index("image")

    first, second = run("a.parquet"), run("b.parquet")
    pd.testing.assert_frame_equal(first, second)
    with pytest.raises(UserError, match=r"written with --keep-reasoning \(the column `reasoning`\), now no --keep"):
        run("a.parquet", keep_reasoning=False)  # the same answers, but not the same columns
    unparsed = first[first["error"].notna()].drop(index="broken.jpg")
    assert len(unparsed) and unparsed["score"].isna().all() and unparsed["probs"].isna().all()
    for image, row in unparsed.iterrows():  # the error holds the generated text
        assert row["error"].startswith("the answer gives no number") and repr(row["reasoning"]) in row["error"], image


def test_reasoning_options_are_checked_in_one_line(setup, tmp_path):
    with pytest.raises(UserError, match="max_new_tokens applies to reasoning models"):  # the API's words
        Scorer.from_pretrained(setup["chain"], device="cpu", max_new_tokens=5, **PIXELS)
    with pytest.raises(UserError, match="prompt does not apply to reasoning"):
        Scorer.from_pretrained(
            setup["chain"], device="cpu", reasoning="q-insight", prompt="<|image_pad|> rate", **PIXELS
        )
    result = run_iqa(
        "score", str(setup["images"]), "--model", str(setup["chain"]), "--reasoning", "deqa", "--out",
        str(tmp_path / "x.parquet"), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --reasoning deqa: use one of q-insight")
    scorer = _scorer(setup["chain"], max_new_tokens=4)
    with pytest.raises(UserError, match="reasoning model answers by generation"):
        scorer.score_tensors(torch.rand(1, 3, 32, 32))


def test_iqa_serve_answers_a_reasoning_model_with_errors_for_answers_without_a_number(setup, monkeypatch, one_thread):
    """The real app (in this process) around a reasoning scorer: a number where the answer gives one, null where it
    does not, with the text as the image's error; the pickle route (a reward's) refuses what has no score."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    requests = pytest.importorskip("requests")
    import base64
    import io
    import pickle

    from tests.test_serve_app import served

    scorer = _scorer(setup["random"], max_new_tokens=6)
    images = _images(setup)
    expected = scorer.score(images, batch_size=8)
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    with served(monkeypatch, scorer, max_batch=8) as url:
        answer = requests.post(f"{url}/score", json={"images": encoded, "probs": True}, timeout=60).json()
        pngs = [base64.b64decode(text) for text in encoded]
        refused = requests.post(f"{url}/", data=pickle.dumps({"images": pngs}), timeout=60)
    for i, (got, want, error) in enumerate(zip(answer["scores"], expected, answer["errors"], strict=True)):
        if want.error is None:
            assert got == want.score and error is None
        else:
            assert got is None and error == f"images[{i}]: {want.error}"
    assert refused.status_code == 422
