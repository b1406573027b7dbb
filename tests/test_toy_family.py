"""The `Backbone` door is real: a toy second family, defined here and registered from the test, is scored by
`Scorer` and by `iqa score`'s pipeline without any change outside tests/.

The toy has its own preprocessing with a per-image number of visual tokens (as Qwen2-VL's patch grids), its own
collate (padded to a fixed row count, with a mask), its own character tokenizer and image slot.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import iqa_cli.models.backbone as backbone_registry
from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.models.backbone import Backbone, BackboneOutput, Family, Provenance, register_family
from iqa_cli.scoring.pipeline import ScoreConfig, score_images
from iqa_cli.scoring.scorer import Scorer

MAX_TOKENS = 12  # visual tokens per image at most: 2 rows x up to 6 columns of mean colours


@dataclass(frozen=True)
class ToyTransform:
    """RGB image -> {"tokens": [2 * W', 3]}, W' from the aspect ratio: a variable-size visual input."""

    def __call__(self, image):
        cols = max(1, min(6, round(2 * image.width / image.height)))
        small = np.asarray(image.resize((cols, 2), Image.Resampling.BOX), dtype=np.float32) / 255
        return {"tokens": torch.from_numpy(small.reshape(-1, 3).copy())}


@dataclass(frozen=True)
class ToyCollate:
    def __call__(self, items, batch_size, dtype):
        tokens = batch_buffer((batch_size, MAX_TOKENS, 3), dtype)
        mask = batch_buffer((batch_size, MAX_TOKENS), dtype)
        tokens.zero_(), mask.zero_()
        for row, item in enumerate(items):
            if item is not None:
                n = item["tokens"].shape[0]
                tokens[row, :n], mask[row, :n] = item["tokens"], 1
        return {"tokens": tokens, "mask": mask}


class ToyTokenizer:
    """One id per character (4 + code point mod 60); the image slot is id 1."""

    def encode(self, text):
        return [4 + ord(c) % 60 for c in text]


class ToyModel(nn.Module):
    def __init__(self, vocab=64, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.visual = nn.Embedding(vocab, width), nn.Linear(3, width)
        self.head, self.regressor = nn.Linear(width, vocab), nn.Linear(width, 1)

    def forward(self, tokens, mask, ids):
        """Mean of the image's tokens plus the mean text embedding -> one hidden state [B, 1, C]."""
        seen = (self.visual(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        hidden = torch.tanh(seen + self.embed(ids.clamp_min(0)).mean(1))[:, None]
        return hidden, self.head(hidden)


class ToyBackbone:
    name, image_token = "toy_vlm", "<img>"

    def __init__(self, model):
        self.model, self.tokenizer, self.preprocessor = model, ToyTokenizer(), None
        self.transform, self.collate = ToyTransform(), ToyCollate()
        self.provenance = Provenance(model="toy")
        self.device, self.dtype, self.has_regressor = torch.device("cpu"), torch.float32, True

    def default_scoring(self):
        return "rate <img> quality:", [], "last"

    def encode_prompt(self, prompt):
        before, after = prompt.split(self.image_token)
        return [*self.tokenizer.encode(before), 1, *self.tokenizer.encode(after)]

    def level_token_id(self, word):
        return self.tokenizer.encode(word)[0]

    def forward(self, visual, input_ids, *, attention_mask=None, logits_at="last", use_cache=False):
        hidden, logits = self.model(visual["tokens"].float(), visual["mask"].float(), input_ids)
        b = input_ids.shape[0]
        return BackboneOutput(logits, hidden, torch.zeros_like(input_ids), torch.zeros(b, dtype=torch.long))

    def decode_step(self, input_ids, past_key_values):
        raise NotImplementedError

    def regress(self, hidden):
        return self.model.regressor(hidden)[:, 0]


def load_toy(model, *, base=None, revision=None, dtype=None, device=None):
    return ToyBackbone(ToyModel())


@pytest.fixture
def toy_checkpoint(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(backbone_registry, "_registered", dict(backbone_registry._registered))  # undone after
    register_family(Family(name="toy_vlm", image_token="<img>", load=load_toy))
    directory = tmp_path / "toy"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "toy_vlm"}))
    return directory


def _images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(40, 20), (20, 40), (30, 30), (60, 20), (24, 36)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _expected(model: ToyModel, image_path: Path) -> tuple[np.ndarray, float, float]:
    """One image alone, straight through the toy model, the level softmax and moments in float64."""
    tokens = ToyTransform()(Image.open(image_path).convert("RGB"))["tokens"]
    backbone = ToyBackbone(model)
    ids = torch.tensor([backbone.encode_prompt("rate <img> quality:")])
    with torch.no_grad():
        hidden, logits = model(tokens[None], torch.ones(1, tokens.shape[0]), ids)
        reg = float(model.regressor(hidden[:, -1])[0, 0])
    level_ids = [backbone.level_token_id(w) for w in ("bad", "poor", "fair", "good", "excellent")]
    z = logits[0, -1, level_ids].double().numpy()
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    centers = np.linspace(1, 5, 5)
    return p, float(p @ centers), reg


def test_a_toy_family_scores_through_the_scorer_and_the_pipeline(toy_checkpoint, tmp_path):
    scorer = Scorer.from_pretrained(toy_checkpoint, device="cpu", dtype="float32")
    assert isinstance(scorer.backbone, Backbone) and scorer.level_names == ["bad", "poor", "fair", "good", "excellent"]
    paths = _images(tmp_path)
    results = scorer.score(paths, batch_size=2)
    model = scorer.backbone.model
    for path, result in zip(paths, results, strict=True):
        probs, score, reg = _expected(model, path)
        np.testing.assert_allclose(result.probs, probs, rtol=0, atol=1e-6)
        assert result.score == pytest.approx(score, abs=1e-5) and result.score_reg == pytest.approx(reg, abs=1e-5)

    out = tmp_path / "scores.parquet"
    config = ScoreConfig(out=out, inputs=[str(p) for p in paths], batch_size=3, workers=1, quiet=True, device="cpu")
    summary = score_images(config, scorer_factory=lambda device: scorer)
    assert (summary.total, summary.failed) == (5, 0)
    frame = pd.read_parquet(out)
    np.testing.assert_allclose(frame["score"].to_numpy(float), [r.score for r in results], rtol=0, atol=1e-5)
    np.testing.assert_allclose(frame["score_reg"].to_numpy(float), [r.score_reg for r in results], rtol=0, atol=1e-5)


def test_a_toy_prompt_without_its_image_token_is_refused_before_loading(toy_checkpoint):
    from iqa_cli.errors import UserError

    with pytest.raises(UserError, match=r"--prompt must hold <img> exactly once"):
        Scorer.from_pretrained(toy_checkpoint, device="cpu", prompt="rate <|image|> quality:")
