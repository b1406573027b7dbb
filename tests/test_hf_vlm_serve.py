"""`iqa serve` with a transformers vision-language model (a tiny random Qwen2-VL checkpoint in the released format):
its JSON and pickle routes against `iqa score` on the same files, a score independent of the images that shared its
model call although Qwen's visual-token counts (and so the call's sequence length) differ, and a broken image as an
error entry. The protocol checks that do not depend on the family are in tests/test_serve.py, whose helpers these
tests use."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_iqa
from tests.test_serve import TOL, b64, requests, serving

# (w, h, format): under Qwen's default budget of about 448x448 pixels each aspect ratio gets its own grid
PHOTOS = [(40, 30, "png"), (30, 40, "jpg"), (33, 33, "webp"), (96, 20, "png"), (600, 500, "jpg")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    return tiny_checkpoint("qwen2_vl", tmp_path_factory.mktemp("serve-qwen") / "qwen2_vl", seed=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-qwen-photos")
    rng = np.random.default_rng(0)
    for i, (w, h, fmt) in enumerate(PHOTOS):
        pixels = np.clip(rng.normal(60 + 35 * i, 50, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.{fmt}")
    return folder


@pytest.fixture(scope="module")
def server(checkpoint):
    """Model calls of 4 rows: the 5 photos of one request take two calls, the second one padded."""
    with serving(checkpoint, "--max-batch", "4", "--max-wait-ms", "50") as url:
        yield url


@pytest.fixture(scope="module")
def cli_scores(checkpoint, photos, tmp_path_factory) -> dict[str, float]:
    """The real `iqa score` in a subprocess on the same files, at its default pixel budget like the server."""
    out = tmp_path_factory.mktemp("serve-qwen-score") / "scores.parquet"
    args = ["--model", str(checkpoint), "--device", "cpu", "--dtype", "float32", "--batch-size", "3", "--quiet"]
    result = run_iqa("score", str(photos), "--out", str(out), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_parquet(out)
    assert frame["error"].isna().all(), frame["error"].tolist()
    return dict(zip(frame["image"], frame["score"].astype(float), strict=True))


def test_visual_token_counts_differ_between_the_photos(checkpoint, photos):
    """What makes the next tests mean something: the photos expand to different numbers of image tokens."""
    from iqa_cli.scoring.scorer import Scorer

    backbone = Scorer.from_pretrained(checkpoint, device="cpu", dtype="float32").backbone
    images = [Image.open(path).convert("RGB") for path in photos.iterdir()]
    grids = {tuple(backbone.transform(image)["image_grid_thw"].tolist()) for image in images}
    assert len(grids) >= 4, grids


def test_json_and_pickle_routes_give_the_scores_of_iqa_score(server, photos, cli_scores):
    names = sorted(cli_scores)
    files = [(photos / name).read_bytes() for name in names]
    expected = [cli_scores[n] for n in names]
    assert np.ptp(expected) > 100 * TOL  # distinct scores: a mixed-up order would show

    response = requests.post(f"{server}/score", json={"images": [b64(f) for f in files], "probs": True}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["range"] == [1, 5] and body["levels"] == ["bad", "poor", "fair", "good", "excellent"]
    assert body["errors"] == [None] * len(names)
    np.testing.assert_allclose(body["scores"], expected, atol=TOL, rtol=0)
    probs = np.asarray(body["probs"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(probs @ np.linspace(1, 5, 5), body["scores"], atol=1e-6)

    response = requests.post(f"{server}/", data=pickle.dumps({"images": files}), timeout=60)
    assert response.status_code == 200, response.text
    outputs = pickle.loads(response.content)["outputs"]
    np.testing.assert_allclose(np.asarray(outputs), np.asarray(expected) / 5, atol=TOL / 5, rtol=0)


def test_a_score_does_not_depend_on_which_images_shared_its_model_call(server, photos, cli_scores):
    """The small square photo alone, then beside the wide and the large ones (longer rows: the call is padded to
    a longer sequence), at another row of the call."""
    names = sorted(cli_scores)
    files = {name: b64((photos / name).read_bytes()) for name in names}

    def scores(images):
        response = requests.post(f"{server}/score", json={"images": images}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["scores"]

    alone = scores([files["2.webp"]])[0]
    assert abs(alone - cli_scores["2.webp"]) < TOL
    assert abs(scores([files["3.png"], files["4.jpg"], files["2.webp"]])[2] - alone) < TOL
    assert abs(scores([files["2.webp"], files["4.jpg"]])[0] - alone) < TOL


def test_a_broken_image_is_an_error_entry_and_the_others_score(server, photos, cli_scores):
    good = ["0.png", "3.png"]
    first, last = (b64((photos / name).read_bytes()) for name in good)
    images = [first, b64(b"\xff\xd8 not really a jpeg"), last]
    response = requests.post(f"{server}/score", json={"images": images}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scores"][1] is None and body["std"][1] is None
    assert body["errors"][0] is None and body["errors"][2] is None
    assert body["errors"][1].startswith("images[1]: ") and "not an image" in body["errors"][1], body["errors"]
    np.testing.assert_allclose([body["scores"][0], body["scores"][2]], [cli_scores[n] for n in good], atol=TOL, rtol=0)
