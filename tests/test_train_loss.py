"""The training forward path against float64 hand computations: collate -> TrainForward -> compute_loss.

A fixed toy batch (four images, two of them partners, questions of different lengths so padding matters)
goes through the real collate and `TrainForward`; every loss term is recomputed in numpy from an unpadded,
one-image-at-a-time forward pass of the same model with the logits read at positions computed here by hand
(tokens after the image slot sit `visual tokens - 1` further on). Also: the Q-Scorer regressor is trained on
the hidden state that scoring reads (`scoring.read_levels`, regressor "last").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from scipy.stats import norm

from iqa_cli.constants import DEFAULT_QUESTION, QUESTIONS
from iqa_cli.models.mplug_owl2.backbone import MPLUGOwl2Backbone
from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
from iqa_cli.models.mplug_owl2.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    LlamaTokenizer,
    level_token_ids,
)
from iqa_cli.scoring.readout import Readout, read_levels
from iqa_cli.training import data as train_data
from iqa_cli.training.config import TrainConfig
from iqa_cli.training.model import TrainForward, add_regressor, level_setup
from iqa_cli.training.objectives import LossSpec, compute_loss
from iqa_cli.training.optimizer import build_optimizer, warmup_steps
from tests.factories import random_pixels, tiny_model

WORDS = ["bad", "poor", "fair", "good", "excellent"]
EPS = 1e-8


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> LlamaTokenizer:
    return LlamaTokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def _rows(n: int) -> train_data.Rows:
    rng = np.random.default_rng(5)
    soft = rng.dirichlet(np.ones(5), size=n).astype(np.float32)
    return train_data.Rows(
        paths=[f"img{i}.png" for i in range(n)],
        group=np.zeros(n, dtype=np.int64),
        mos=np.array([1.5, 4.2, 3.1, 2.2])[:n],
        std=np.array([0.3, 0.6, 0.0, 0.4])[:n],
        mos_raw=np.zeros(n),
        level=np.array([0, 4, 2, 1])[:n],
        soft=soft,
        question=np.array([0, 7, 3, 9])[:n],  # "Rate the quality of this image." is the shortest
    )


def _batch(backbone, rows, table, pixels, paired: bool):
    def item(row: int) -> dict:
        enc = table[int(rows.question[row]), int(rows.level[row])]
        visual = {"pixel_values": pixels[row]}
        return {"row": row, "path": rows.paths[row], "visual": visual, "error": None, "enc": enc}

    keys = [(0, 1), (2, 3)] if paired else [(i, -1) for i in range(len(rows))]
    items = [(item(a), item(b) if b >= 0 else None) for a, b in keys]
    return train_data.Collate(backbone.pad_id, rows, paired=paired, visual_collate=backbone.collate)(items)


def _unpadded_logits(model, enc: train_data.Encoded, pixels: torch.Tensor) -> np.ndarray:
    """[T, V] float64 logits at each input token's position, from a forward pass of this image alone."""
    ids = list(enc.input_ids)
    slot = ids.index(IMAGE_TOKEN_INDEX)
    with torch.no_grad():
        out = model(torch.tensor([ids]), pixels[None], logits_at="all").logits[0].double().numpy()
    extra = model.num_visual_tokens - 1
    positions = [t if t <= slot else t + extra for t in range(len(ids))]
    return out[positions]


def _np_response_ce(logits: np.ndarray, labels: list[int], skip: int | None) -> tuple[float, int]:
    total, n = 0.0, 0
    for t in range(1, len(labels)):
        if labels[t] == IGNORE_INDEX or t == skip:
            continue
        total -= log_softmax(logits[t - 1])[labels[t]]
        n += 1
    return total, n


def test_deqa_loss_terms_equal_a_float64_hand_computation(tok):
    model = tiny_model(seed=2)
    backbone = MPLUGOwl2Backbone(model, tok, None)
    level_ids = level_token_ids(tok, WORDS)
    table = train_data.encode_conversations(backbone, QUESTIONS, WORDS, level_ids, image_first=True)
    rows = _rows(4)
    pixels = random_pixels(4, model.config, seed=1)
    batch = _batch(backbone, rows, table, pixels, paired=True)
    assert batch.pairs == 2 and batch.attention_mask.min() == 0  # padding is exercised
    forward = TrainForward(model, backbone)
    with torch.no_grad():
        logits, pred = forward(batch.input_ids, batch.visual, batch.attention_mask)
    assert pred is None
    spec = LossSpec("deqa", tuple(level_ids), {"w_fid": 1.0, "w_tok": 0.05, "w_kl": 1.0}, True, True, True,
                          0.0, 1.0, 0.0, 0.0, 0.0)  # fmt: skip
    parts = compute_loss(spec, logits, None, batch)

    c = np.linspace(1, 5, 5)
    sides = {"A": [0, 2], "B": [1, 3]}  # rows of the A and B images in the pair order (0, 1), (2, 3)
    ce, kl, means = {}, {}, {}
    for side, members in sides.items():
        total, count, kls, mus = 0.0, 0, [], []
        for row in members:
            enc = table[int(rows.question[row]), int(rows.level[row])]
            full = _unpadded_logits(model, enc, pixels[row])
            at = full[enc.level_pos - 1]
            p = rows.soft[row].astype(np.float64)
            log_q = log_softmax(at)[level_ids]
            kls.append(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - log_q), 0.0)))
            mus.append(softmax(at[level_ids]) @ c)
            s, n = _np_response_ce(full, list(enc.labels), skip=enc.level_pos)
            total, count = total + s, count + n
        ce[side], kl[side], means[side] = total / count, np.mean(kls), np.array(mus)
    gt = norm.cdf((rows.mos[[0, 2]] - rows.mos[[1, 3]]) / np.sqrt(rows.std[[0, 2]] ** 2 + rows.std[[1, 3]] ** 2 + EPS))
    pred_p = norm.cdf((means["A"] - means["B"]) / np.sqrt(2.0))
    fidelity = np.mean(1 - np.sqrt(gt * pred_p + EPS) - np.sqrt((1 - gt) * (1 - pred_p) + EPS))
    expected_ce, expected_kl = ce["A"] + ce["B"], kl["A"] + kl["B"]
    got = parts.log_dict()
    np.testing.assert_allclose(got["cross_entropy"], expected_ce, rtol=2e-5)
    np.testing.assert_allclose(got["kl"], expected_kl, rtol=2e-5)
    np.testing.assert_allclose(got["fidelity"], fidelity, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["total"], fidelity + 0.05 * (expected_ce + expected_kl), rtol=2e-5)


def test_qalign_loss_is_the_response_ce_with_the_level_token_included(tok):
    model = tiny_model(seed=4)
    backbone = MPLUGOwl2Backbone(model, tok, None)
    level_ids = level_token_ids(tok, WORDS)
    table = train_data.encode_conversations(backbone, QUESTIONS, WORDS, level_ids, image_first=True)
    rows = _rows(3)
    pixels = random_pixels(3, model.config, seed=2)
    batch = _batch(backbone, rows, table, pixels, paired=False)
    with torch.no_grad():
        logits, _ = TrainForward(model, backbone)(batch.input_ids, batch.visual, batch.attention_mask)
    spec = LossSpec("qalign", tuple(level_ids), {"w_fid": 0.0, "w_tok": 1.0, "w_kl": 0.0}, True, True, True,
                          0.0, 1.0, 0.0, 0.0, 0.0)  # fmt: skip
    got = compute_loss(spec, logits, None, batch).log_dict()
    total, count = 0.0, 0
    for row in range(3):
        enc = table[int(rows.question[row]), int(rows.level[row])]
        s, n = _np_response_ce(_unpadded_logits(model, enc, pixels[row]), list(enc.labels), skip=None)
        total, count = total + s, count + n
    np.testing.assert_allclose(got["cross_entropy"], total / count, rtol=2e-5)
    np.testing.assert_allclose(got["total"], total / count, rtol=2e-5)


def test_qscorer_regressor_and_levels_are_trained_where_scoring_reads_them(tok, tmp_path):
    """With the scoring layout and question, training's regressor input and level logits are exactly the
    ones `read_levels` computes from the run's scoring ids (iqa.json `input_ids`, regressor "last")."""
    model = tiny_model(seed=6)
    config = TrainConfig.from_options(datasets=["x"], out=tmp_path, method="qscorer", mlp_dims=[16, 16])
    tok = LlamaTokenizer.from_dir(tok.save(tmp_path / "tok"))
    backbone = MPLUGOwl2Backbone(model, tok, None)
    add_regressor(config, backbone)
    levels = level_setup(config, WORDS, backbone)
    assert levels.tokens == tuple(f"<score{i}>" for i in range(1, 6)) and levels.regressor == "last"
    assert tok.id_to_token(levels.input_ids[-1]) == "▁"  # the piece between "is" and an added score token
    table = train_data.encode_conversations(backbone, [DEFAULT_QUESTION], levels.tokens, levels.ids, image_first=False)
    rows = _rows(4)
    rows.question[:] = 0
    pixels = random_pixels(4, model.config, seed=3)
    batch = _batch(backbone, rows, table, pixels, paired=False)
    assert all(list(batch.input_ids[i, : batch.level_pos[i]]) == list(levels.input_ids) for i in range(4))
    model.eval()
    with torch.no_grad():
        logits, pred = TrainForward(model, backbone)(
            batch.input_ids, batch.visual, batch.attention_mask, batch.level_pos - 1
        )
    readout = Readout(levels.input_ids, levels.ids, levels.names, levels.prompt, "last")
    scored = read_levels(backbone, {"pixel_values": pixels}, readout)
    torch.testing.assert_close(pred, scored.score_reg, rtol=1e-5, atol=1e-5)
    at = logits[torch.arange(4), batch.level_pos - 1][:, list(levels.ids)]
    torch.testing.assert_close(torch.softmax(at, -1), scored.probs, rtol=1e-5, atol=1e-6)
    # and the loss reads the regressor with the reference's [0, 5] clamp
    spec = LossSpec("qscorer", levels.ids, {"w_fid": 0.0, "w_tok": 0.05, "w_kl": 0.0}, True, True, True,
                          0.0, 1.0, 0.0, 0.0, 0.0)  # fmt: skip
    got = compute_loss(spec, logits, pred, batch).log_dict()
    expected_mse = float(((pred.clamp(0, 5) - batch.mos) ** 2).mean())
    np.testing.assert_allclose(got["mse"], expected_mse, rtol=1e-6)


def test_cosine_schedule_with_warmup_matches_the_reference_formula():
    """The schedule `build_optimizer` steps through: linear warmup over ceil(total * ratio) steps, then cosine to 0
    (transformers' formula, which the reference's Trainer used), computed here in float64."""
    total, warm = 200, warmup_steps(200, 0.03)
    assert warm == 6  # ceil(200 * 0.03)
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), 2e-5, 0.0, total, 0.03)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"] / 2e-5)
        optimizer.step()
        scheduler.step()
    steps = np.arange(total + 1, dtype=np.float64)
    expected = np.where(steps < warm, steps / warm, 0.5 * (1 + np.cos(np.pi * (steps - warm) / (total - warm))))
    np.testing.assert_allclose(lrs, expected, rtol=1e-12, atol=1e-15)
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.5) and lrs[6] == pytest.approx(1.0)
