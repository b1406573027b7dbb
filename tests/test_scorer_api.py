"""`from iqa_cli import Scorer` as a Python user meets it: one path or a list, a batch's rows without its padding,
and errors in the API's words (keyword arguments, not the command line's flags)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli import Scorer
from iqa_cli.errors import UserError, api_words, speak_flags
from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    return Scorer.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("api") / "tiny"), device="cpu")


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_one_path_gives_one_result_and_a_list_gives_a_list(scorer, photos):
    one = scorer.score(str(photos[0]))
    assert one == scorer.score(photos[0]) == scorer.score(Image.open(photos[0]))
    listed = scorer.score(photos, batch_size=2)
    assert listed[0].score == pytest.approx(one.score, abs=1e-6)
    assert len(listed) == 3 and one.width == 30 and one.height == 20


def test_score_batch_returns_the_images_rows_not_the_padding(scorer, photos):
    items = [scorer.transform(Image.open(p).convert("RGB")) for p in photos]
    padded = scorer.collate(items, 8, torch.float32)
    assert next(iter(padded.values())).shape[0] == 8  # the model call has 8 rows
    out = scorer.score_batch(padded)
    assert out.score.shape == (3,) and out.probs.shape == (3, len(scorer.level_names))
    alone = scorer.score_batch(scorer.collate(items))  # batch_size defaults to the items
    torch.testing.assert_close(out.score, alone.score, rtol=0, atol=1e-6)
    raw = scorer.score_batch({k: v for k, v in padded.items()})  # a plain dict: every row, as the pipeline's
    assert raw.score.shape == (8,)


def test_api_errors_name_keyword_arguments_and_commands_their_flags(scorer, tmp_path, monkeypatch):
    monkeypatch.setattr("iqa_cli.errors._flags_spoken", False)
    with pytest.raises(UserError) as raised:
        Scorer.from_pretrained(scorer.backbone.provenance.model, device="cpu", prompt="no image token here")
    assert str(raised.value).startswith("prompt must hold <|image|> exactly once")
    with pytest.raises(UserError, match=r"^min_pixels does not apply to mplug_owl2 models"):
        Scorer.from_pretrained(scorer.backbone.provenance.model, device="cpu", min_pixels=1000)
    with pytest.raises(UserError, match=r"^batch_size must be at least 1"):
        scorer.score([], batch_size=0)
    assert api_words("--min-pixels 2000 is above --max-pixels 1000; see `iqa score -h`") == (
        "min_pixels 2000 is above max_pixels 1000; see `iqa score -h`"
    )
    previous = speak_flags()
    try:
        with pytest.raises(UserError, match=r"^--prompt must hold"):
            Scorer.from_pretrained(scorer.backbone.provenance.model, device="cpu", prompt="no image token here")
    finally:
        speak_flags(previous)
