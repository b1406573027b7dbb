"""`Scorer.score_tensors` for transformers vision-language models (iqa_cli/models/hf_vlm/preprocess.py): Qwen-VL's
and LLaVA-OneVision's preprocessing in torch against the family's own processor, scores against the PIL path, batch
invariance and the gradient with respect to the pixels; Idefics3 (no torch preprocessing) refuses in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.models.hf_vlm import PATCH_GRID_FAMILIES
from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint
from iqa_cli.scoring.scorer import Scorer

FAMILIES = (*PATCH_GRID_FAMILIES, "llava_onevision")


def _side(family: str) -> int:
    """An image side at the family's target size: Qwen-VL two merged patches (patch * merge = 28, or 32 for
    Qwen3-VL); LLaVA-OneVision its base size, also its smallest pinpoint (no crop resized)."""
    return {"qwen3_vl": 64, "llava_onevision": 28}.get(family, 56)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, Scorer]:
    """Each Qwen-VL family at a fixed budget of side x side pixels (min = max): a side x side image is not resized."""
    root = tmp_path_factory.mktemp("hf_vlm_tensors")
    out = {}
    for family in FAMILIES:
        budget = {"min_pixels": _side(family) ** 2, "max_pixels": _side(family) ** 2} if family != FAMILIES[-1] else {}
        checkpoint = tiny_checkpoint(family, root / family)
        out[family] = Scorer.from_pretrained(checkpoint, device="cpu", dtype="float32", **budget)
    return out


def _arrays(family: str) -> list[np.ndarray]:
    """(h, w): at the target size, then up- and downscaled of both orientations."""
    side = _side(family)
    rng = np.random.default_rng(0)
    sizes = [(side, side), (40, 70), (90, 33), (2 * side, side), (20, 14)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_inputs_equal_the_processors_and_scores_the_pil_path(scorers, family):
    """Measured: at the target size pixels within 4e-5 uint8 steps (float rounding) and the same score (2e-7);
    resized, pixels within 1.07 steps (max) and 0.31 (mean) of the processor's uint8 resize, scores within 3e-4
    (the tiny random models' scores sit near 3, so this says little about a trained model)."""
    scorer = scorers[family]
    backbone = scorer.backbone
    std = torch.tensor(backbone.preprocessor.image_std)[None, :, None] * 255  # one uint8 step, normalized units
    arrays = _arrays(family)
    for i, array in enumerate(arrays):
        reference = backbone.transform(Image.fromarray(array))
        ours = backbone.tensor_inputs(as_tensor(array))
        assert set(ours) == {*reference, "has_image"}
        for key in reference:  # ids, grids, sizes: exactly the processor's
            if not reference[key].is_floating_point():
                assert torch.equal(ours[key], reference[key]), key
        assert ours["pixel_values"].shape == reference["pixel_values"].shape
        steps = (ours["pixel_values"] - reference["pixel_values"]).reshape(len(ours["pixel_values"]), 3, -1) * std
        if i == 0:  # the target size: no resize, the processor's own arithmetic
            assert steps.abs().max() < 1e-3
        else:
            assert steps.abs().max() < 1.3 and steps.abs().mean() < 0.4, (array.shape, steps.abs().max())

    pil = np.asarray([r.score for r in scorer.score([Image.fromarray(a) for a in arrays], batch_size=1)])
    tensors = scorer.score_tensors([as_tensor(a) for a in arrays], batch_size=4)
    assert tensors.probs.shape == (len(arrays), 5)
    diff = np.abs(pil - tensors.score.numpy())
    assert diff[0] < 1e-6 and diff.max() < 5e-4, diff


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_a_score_does_not_depend_on_its_batch_mates(scorers, family):
    scorer = scorers[family]
    images = [as_tensor(a) for a in _arrays(family)]
    alone = scorer.score_tensors([images[0]], batch_size=4).score[0]
    mixed = scorer.score_tensors([images[1], images[3], images[0]], batch_size=4).score  # other grids, padded
    assert float(abs(mixed[2] - alone)) < 1e-5
    assert float(abs(scorer.score_tensors(images[1:], batch_size=2).score[0] - mixed[0])) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_the_score_is_differentiable_with_respect_to_the_pixels(scorers, family):
    images = [as_tensor(a).requires_grad_(True) for a in _arrays(family)[:2]]  # the second one resized
    score = scorers[family].score_tensors(images, differentiable=True, batch_size=2).score
    assert score.requires_grad
    grads = torch.autograd.grad(score.sum(), images)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["idefics3"])
def test_families_without_torch_preprocessing_refuse_in_one_line(tmp_path, family):
    scorer = Scorer.from_pretrained(tiny_checkpoint(family, tmp_path / family), device="cpu", dtype="float32")
    with pytest.raises(UserError, match=f"^{family}: score_tensors supports qwen2_vl, .*llava_onevision only") as info:
        scorer.score_tensors([torch.rand(3, 28, 28)])
    assert "\n" not in str(info.value)
