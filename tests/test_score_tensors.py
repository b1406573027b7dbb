"""`Scorer.score_tensors`: scoring float tensors in torch (training loops, rewards), against the PIL path,
batch invariance, and the gradient of the score with respect to the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli.scoring.scorer import Scorer

# (width, height): down- and upscaled, landscape and portrait (padded), and one at the model's 28 px (no resize).
SIZES = [(40, 30), (30, 40), (28, 28), (20, 14), (64, 20), (300, 200), (17, 90)]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Scorer:
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("tensors") / "deqa", seed=3)
    return Scorer.from_pretrained(checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.clip(rng.normal(120, 50, (h, w, 3)), 0, 255).astype(np.uint8) for w, h in SIZES]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.fixture
def one_thread():
    """One intra-op thread: with more, the CPU GEMM splits a batch's rows between threads and a row's rounding
    depends on its position (1 ulp); the server runs its CPU workers this way for the same reason."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pixels_and_scores_are_close_to_the_pil_path(scorer, arrays):
    """Measured here: pixels within 1.5/255 (max) and 0.25/255 (mean) of Pillow's; scores within 0.012 on the
    1..5 scale (the tiny model at 28 px, largest for the 20x14 upscale); identical where no resize happens."""
    preprocessor = scorer.preprocessor
    unit = np.asarray(preprocessor.image_std)[:, None, None] * 255  # one uint8 step in normalized units
    for array in arrays:
        reference = preprocessor.pixels(Image.fromarray(array))
        ours = preprocessor.tensor_pixels(as_tensor(array)).numpy()
        assert ours.shape == reference.shape
        steps = np.abs(ours - reference) * unit
        assert steps.max() <= 1.6 and steps.mean() <= 0.3, (array.shape, steps.max(), steps.mean())

    pil = [r.score for r in scorer.score([Image.fromarray(a) for a in arrays], batch_size=1)]
    tensors = scorer.score_tensors([as_tensor(a) for a in arrays])
    assert tensors.score.device == scorer.device and tensors.probs.shape == (len(arrays), 5)
    diff = np.abs(np.asarray(pil) - tensors.score.numpy())
    assert diff.max() < 0.015, diff
    assert diff[SIZES.index((28, 28))] < 1e-6  # no resize: the same pixels, the same score


def test_a_score_does_not_depend_on_the_other_images(scorer, arrays, one_thread):
    images = [as_tensor(a) for a in arrays]
    alone = scorer.score_tensors([images[0]], batch_size=4).score[0]
    mixed = scorer.score_tensors([*images[1:4], images[0], *images[4:]], batch_size=4).score
    assert mixed[3] == alone  # another row of a call, other neighbours: bit for bit
    assert scorer.score_tensors(images[4:] + images[:1], batch_size=4).score[-1] == alone  # the padded call
    batch = torch.stack([images[2]] * 3)  # [B, 3, H, W] input
    assert torch.equal(scorer.score_tensors(batch, batch_size=4).score, scorer.score_tensors([images[2]] * 3).score)


def test_the_score_is_differentiable_with_respect_to_the_pixels(scorer, arrays):
    pixels = as_tensor(arrays[0]).clone().requires_grad_(True)
    score = scorer.score_tensors([pixels], differentiable=True, batch_size=2).score
    assert score.requires_grad
    (grad,) = torch.autograd.grad(score.sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    # A few steps of gradient ascent on the pixels raise the score.
    x = as_tensor(arrays[0]).clone()
    scores = []
    for _ in range(4):
        x.requires_grad_(True)
        value = scorer.score_tensors([x], differentiable=True, batch_size=2).score[0]
        scores.append(float(value.detach()))
        (grad,) = torch.autograd.grad(value, x)
        x = (x.detach() + 0.02 * grad.sign()).clamp(0, 1)
    scores.append(float(scorer.score_tensors([x]).score[0]))
    assert scores[1] > scores[0] and scores[-1] > scores[0] + 0.2, scores  # measured: 3.35 -> 3.70 -> ... 3.88


def test_bad_tensors_are_refused(scorer):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        scorer.score_tensors(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="images\\[1\\]"):
        scorer.score_tensors([torch.zeros(3, 28, 28), torch.zeros(4, 28, 28)])
    with pytest.raises(ValueError, match="images\\[0\\]"):
        scorer.score_tensors([torch.zeros(3, 28, 28, dtype=torch.uint8)])


def test_pyiqa_style_metric_has_pyiqa_attributes_and_scores_like_the_scorer(scorer, arrays, tmp_path):
    from iqa_cli.pyiqa import create_metric, list_models

    assert list_models() == ["deqa", "qalign", "qscorer"]
    with pytest.raises(KeyError, match="Unknown metric: niqe"):
        create_metric("niqe")
    checkpoint = scorer.backbone.provenance.weights_dir
    metric = create_metric("deqa", device="cpu", model=checkpoint, dtype="float32")
    assert (metric.score_range, metric.lower_better, metric.metric_mode) == ("1, 5", False, "NR")

    batch = torch.stack([as_tensor(arrays[2])] * 2)  # 28x28: a batch [B, 3, H, W]
    values = metric(batch)
    assert values.shape == (2,) and not values.requires_grad
    assert torch.equal(values, scorer.score_tensors(batch).score)
    path = tmp_path / "a.png"
    Image.fromarray(arrays[0]).save(path)
    assert metric(str(path)).tolist() == pytest.approx([scorer.score([path])[0].score], abs=1e-6)  # PIL pixels
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(batch * 2)

    loss = create_metric("deqa", as_loss=True, device="cpu", model=checkpoint, dtype="float32", loss_weight=0.5)
    pixels = batch.clone().requires_grad_(True)
    value = loss(pixels)
    assert value.dim() == 0 and value.item() == pytest.approx(0.5 * float(values.mean()), abs=1e-6)
    value.backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
