"""iqa against files its authors' own code wrote: DeQA-Score's `gen_soft_label.py` on small files in the official
formats, and the original mPLUG-Owl2 (DeQA-Score's `src/model`, transformers 4.36.1) on a tiny checkpoint.

The files are in tests/fixtures/reference-golden/; how they were made (script, commit, environment, command)
is in tests/fixtures/README.md. Nothing here re-creates the reference: the numbers are read from the files.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import FIXTURES

GOLDEN = FIXTURES / "reference-golden"
PRESETS = {  # preset -> its official file name
    "koniq": "koniq10k_scores_and_distributions.csv",
    "spaq": "MOS and Image attribute scores.csv",
    "kadid": "dmos.csv",
}
LEVELS = ["bad", "poor", "fair", "good", "excellent"]


def _printed(text: str) -> dict[str, float]:
    """gen_soft_label.py's statistics lines -> iqa's summary names (tests/test_labels.py `printed_statistics`)."""
    number = r"(-?[0-9.e+-]+|nan)"
    patterns = {
        ("srcc", "plcc"): rf"^srcc: {number} plcc: {number}$",
        ("raw_diff_l1", "raw_diff_l2"): rf"^\[raw_diff\] l1: {number} l2: {number}$",
        ("diff_l1", "diff_l2"): rf"^\[diff\] l1: {number} l2: {number}$",
        ("alpha_mean", "alpha_std"): rf"^\[alpha\] mean: {number} std: {number}$",
        ("beta_mean", "beta_std"): rf"^\[beta\] mean: {number} std: {number}$",
        ("binary", "all"): r"^binary / all: (\d+) / (\d+)$",
    }
    found = {}
    for keys, pattern in patterns.items():
        match = re.search(pattern, text, flags=re.MULTILINE)
        assert match, (pattern, text)
        for key, value in zip(keys, match.groups(), strict=True):
            found[key] = int(value) if key in ("binary", "all") else float(value)
    return found


@pytest.mark.parametrize("density", ["pdf", "cdf"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_prepare_writes_the_soft_labels_gen_soft_label_wrote(preset, density, iqa, tmp_path):
    from tests.test_labels import assert_printed_equal, printed_statistics

    folder = GOLDEN / "labels" / preset
    out = tmp_path / "meta.parquet"
    code, stdout, err = iqa("prepare", preset, "--csv", folder / PRESETS[preset], "--split", folder / "split.json",
                            "--density", density, "--out", out, "--json")  # fmt: skip
    assert code == 0, err
    frame = pq.read_table(out).to_pandas().set_index("image")
    reference = json.loads((folder / f"gen_soft_label-{density}.json").read_text())
    train = frame[frame["split"] == "train"]
    assert sorted(train.index) == sorted(row["id"].split("->")[0] for row in reference)
    fallback = 0
    for row in reference:
        mine = frame.loc[row["id"].split("->")[0]]
        assert mine["mos_norm"] == row["gt_score_norm"] and mine["std_norm"] == row["std_norm"], row["id"]
        # the reference lists levels from excellent down, as float64; iqa stores them ascending, as float32
        want = np.asarray(row["level_probs"][::-1], dtype=np.float64).astype(np.float32)
        assert np.array_equal(np.asarray(mine["soft_label"]), want), row["id"]
        assert LEVELS[mine["level"]] == row["response"].removeprefix("The quality of the image is ").rstrip(".")
        fallback += bool(mine["fallback"])
    assert 0 < fallback < len(reference)  # both kinds of label are among the rows compared
    printed = _printed((folder / f"gen_soft_label-{density}.txt").read_text())
    summary = json.loads(stdout)
    assert summary["label_rule"] == "reference"
    mine = printed_statistics(summary["labels"])
    mine.pop("clipped")
    assert_printed_equal(mine, printed)


# --- the original mPLUG-Owl2 on a tiny checkpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "mplug_owl2_logits.json").read_text())


@pytest.fixture(scope="module")
def scorer():
    from iqa_cli.scoring.scorer import Scorer

    return Scorer.from_pretrained(GOLDEN / "model", device="cpu", dtype="float32")


def test_prompt_ids_and_level_ids_are_the_reference_tokenizers(golden, scorer):
    assert json.loads(scorer.metadata["input_ids"]) == golden["input_ids"]
    assert scorer.metadata["prompt"] == golden["prompt"]
    assert json.loads(scorer.metadata["level_token_ids"]) == golden["level_ids"][::-1]  # ascending quality


def test_preprocessed_pixels_are_the_reference_processors(golden, scorer):
    images = [Image.open(GOLDEN / "model" / name).convert("RGB") for name in golden["images"]]
    mine = scorer.collate([scorer.transform(image) for image in images], len(images), torch.float32)
    torch.testing.assert_close(mine["pixel_values"], torch.from_numpy(np.load(GOLDEN / "mplug_owl2_pixels.npy")))


def test_last_position_logits_equal_the_original_mplug_owl2(golden):
    from iqa_cli.models.mplug_owl2.checkpoints import load_mplug_owl2

    model = load_mplug_owl2(GOLDEN / "model", dtype=torch.float32).model
    pixels = torch.from_numpy(np.load(GOLDEN / "mplug_owl2_pixels.npy"))
    ids = torch.tensor([golden["input_ids"]] * pixels.shape[0])
    with torch.no_grad():
        logits = model(ids, pixels, logits_at="last").logits[:, 0]
    want = torch.tensor(golden["last_logits"])
    assert float(want.std()) > 0.5  # informative logits, every vocabulary row
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)  # 2.2e-6 measured
    torch.testing.assert_close(logits[:, golden["level_ids"]], torch.tensor(golden["level_logits"]), rtol=0, atol=1e-5)


def test_scores_from_the_image_files_equal_the_reference_scorer(golden, scorer):
    """Files -> expand to a square, CLIP preprocessing, the model, the closed-set readout: as the authors'
    Scorer (in float32 here, where theirs runs float16 on a GPU)."""
    rows = scorer.score([GOLDEN / "model" / name for name in golden["images"]], batch_size=2)
    np.testing.assert_allclose([r.score for r in rows], golden["scores"], rtol=0, atol=1e-5)
    want = torch.softmax(torch.tensor(golden["level_logits"]), -1).numpy()[:, ::-1]  # ascending quality
    np.testing.assert_allclose(np.stack([r.probs for r in rows]), want, rtol=0, atol=1e-5)
