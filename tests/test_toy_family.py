"""The `Backbone` door is real: a toy second family, defined here and registered from the test, is scored by
`Scorer` and by `iqa score`'s pipeline, and trained by `iqa train`'s `train`, without any change outside tests/.

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
from iqa_cli.constants import DEFAULT_QUESTION, IGNORE_INDEX
from iqa_cli.models.backbone import (
    Backbone,
    BackboneOutput,
    Family,
    Provenance,
    TrainableBackbone,
    load_backbone,
    register_family,
)
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.scoring.driver import score_images
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
    """One id per character (4 + code point mod 60); the image slot is id 1, padding id 0."""

    pad_id = 0

    def encode(self, text):
        return [4 + ord(c) % 60 for c in text]


class ToyModel(nn.Module):
    def __init__(self, vocab=64, width=8):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.visual = nn.Embedding(vocab, width), nn.Linear(3, width)
        self.head, self.regressor = nn.Linear(width, vocab), nn.Linear(width, 1)

    def forward(self, tokens, mask, ids, per_position=False):
        """Mean of the image's tokens plus the mean text embedding -> one hidden state [B, 1, C]; with
        `per_position`, causal: position t sees the image and ids[: t + 1] -> [B, T, C]."""
        seen = (self.visual(tokens) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        embedded = self.embed(ids.clamp_min(0))
        if per_position:
            counts = torch.arange(1, ids.shape[1] + 1, dtype=embedded.dtype)[:, None]
            hidden = torch.tanh(seen[:, None] + embedded.cumsum(1) / counts)
        else:
            hidden = torch.tanh(seen + embedded.mean(1))[:, None]
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

    # what training needs on top (TrainableBackbone)
    lora_targets, processing_files, vocab_size, pad_id = ("head",), (), 64, ToyTokenizer.pad_id

    def prompt(self, question, image_first):
        return f"<img> {question} quality:" if image_first else f"{question} <img> quality:"

    @property
    def default_prompt(self):
        return self.prompt(DEFAULT_QUESTION, image_first=False)

    def level_token_ids(self, words):
        return [self.level_token_id(w) for w in words]

    def add_tokens(self, tokens):
        raise NotImplementedError

    def record_score_tokens(self, ids):
        raise NotImplementedError

    def encode_training(self, question, level_token, level_token_id, *, image_first):
        """The prompt, then the level's id and a full stop as the supervised response."""
        prompt = self.encode_prompt(self.prompt(question, image_first))
        response = [level_token_id, *self.tokenizer.encode(".")]
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt)

    def add_regressor(self, dims):
        pass  # the toy always has one

    def lora_target_modules(self, suffixes):
        return [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear) and name in suffixes]

    def trainable_groups(self):
        m = self.model
        return {"vision": list(m.visual.parameters()), "projector": [], "output": [m.head.weight],
                "regressor": list(m.regressor.parameters())}  # fmt: skip

    def set_gradient_checkpointing(self, enabled=True):
        pass

    def fsdp_units(self):
        return []

    def training_forward(self, module, visual, input_ids, attention_mask, hidden_at=None):
        hidden, logits = module(visual["tokens"], visual["mask"], input_ids, per_position=True)
        at = hidden[torch.arange(len(input_ids)), hidden_at] if hidden_at is not None else None
        return logits, at

    def save(self, out, *, state=None, dtype=None, processing=True):
        out = Path(out)
        (out / "config.json").write_text(json.dumps({"model_type": self.name}))
        torch.save(state if state is not None else self.model.state_dict(), out / TOY_WEIGHTS)

    def save_adapter(self, peft_model, out, base):
        raise NotImplementedError


TOY_WEIGHTS = "toy.pt"


def load_toy(model, *, base=None, revision=None, dtype=None, device=None):
    toy = ToyModel()
    if (Path(model) / TOY_WEIGHTS).is_file():  # a run `iqa train` wrote
        toy.load_state_dict(torch.load(Path(model) / TOY_WEIGHTS, weights_only=True))
    return ToyBackbone(toy)


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

    with pytest.raises(UserError, match=r"^prompt must hold <img> exactly once"):
        Scorer.from_pretrained(toy_checkpoint, device="cpu", prompt="rate <|image|> quality:")


def test_a_toy_family_trains_two_steps_through_iqa_train(toy_checkpoint, tmp_path):
    from iqa_cli.training import TrainConfig, train
    from tests.test_train_data import prepare_synthetic

    data = prepare_synthetic(tmp_path, "synth", 12, size=(40, 32))
    out = tmp_path / "run"
    config = TrainConfig.from_options(datasets=["synth"], data_dir=data, model=str(toy_checkpoint), out=out,
                                      method="qalign", epochs=1, max_steps=2, batch_size=2, lr=1e-2, workers=0,
                                      quiet=True)  # fmt: skip
    assert isinstance(load_toy(toy_checkpoint), TrainableBackbone)
    result = train(config)
    assert result.steps == 2 and result.final_eval  # the in-loop evaluation scored the test split through the toy
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert [s["step"] for s in steps] == [1, 2] and all(np.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)
    run = json.loads((out / "iqa.json").read_text())
    assert run["family"] == "toy_vlm" and run["prompt"] == f"{DEFAULT_QUESTION} <img> quality:"
    trained, initial = load_backbone(out).model, ToyModel()  # the registry finds the family in iqa.json
    assert not torch.equal(trained.head.weight, initial.head.weight)  # the steps changed the weights
    assert torch.equal(trained.regressor.weight, initial.regressor.weight)  # qalign leaves the regressor alone
