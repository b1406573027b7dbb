"""`--quantize int8|int4` (weight-only, torchao) on the tiny checkpoint.

int8 is checked against an independent reimplementation of weight-only int8 written here: every Linear but
the LM head gets per-row symmetric weights, scale = max|w_row| / 127.5, q = clamp(round(w * (1 / scale)),
-128, 127), in float32 (torchao's `choose_qparams_affine` / `quantize_affine` rule); the float model with
those weights must give the quantized model's scores. int4 needs CUDA and bfloat16 (see
`iqa_cli/scoring/quantize.py`); on the CPU it is a one-line error, and on a GPU it is compared with bf16.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from typer.testing import CliRunner

from iqa_cli.cli import app
from iqa_cli.errors import UserError
from iqa_cli.scoring import quantize
from iqa_cli.scoring.scorer import Scorer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from iqa_cli.models.mplug_owl2.tiny import build_tiny_tokenizer
    from tests.factories import tiny_model, write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(tiny_model(seed=3), root / "deqa", tokenizer_dir=build_tiny_tokenizer(root / "tok"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = np.clip(rng.normal(30 * i, 50, (30 + i, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def _scores(scorer: Scorer, folder) -> np.ndarray:
    return np.array([r.score for r in scorer.score(sorted(folder.glob("*.png")), batch_size=4)])


def _int8_round_trip(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                w = module.weight
                scale = (w.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
                module.weight.copy_(torch.clamp(torch.round(w * (1.0 / scale)), -128, 127) * scale)


def test_int8_scores_equal_an_independent_int8_round_trip(checkpoint, photos):
    float32 = Scorer.from_pretrained(checkpoint.path, device="cpu", dtype="float32")
    int8 = Scorer.from_pretrained(checkpoint.path, device="cpu", dtype="float32", quantize="int8")
    linears = {n: m for n, m in int8.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(type(m.weight).__name__ == "Int8Tensor" for n, m in linears.items() if not n.endswith("lm_head"))
    assert int8.metadata["quantize"] == "int8" and "quantize" not in float32.metadata
    plain, quantized = _scores(float32, photos), _scores(int8, photos)
    _int8_round_trip(float32.model)
    np.testing.assert_allclose(quantized, _scores(float32, photos), atol=2e-5)
    assert np.abs(quantized - plain).max() > 1e-4  # the weights really changed ...
    assert spearmanr(quantized, plain)[0] > 0.9  # ... and the ranking barely did


def test_cli_quantize_int8_writes_what_the_api_scores(checkpoint, photos, tmp_path):
    out = tmp_path / "s.parquet"
    args = ["score", str(photos), "--out", str(out), "--model", str(checkpoint.path), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--quantize", "int8", "--quiet"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert json.loads(table.schema.metadata[b"request"])["quantize"] == "int8"
    api = Scorer.from_pretrained(checkpoint.path, device="cpu", dtype="float32", quantize="int8")
    np.testing.assert_allclose(table.column("score").to_numpy(), _scores(api, photos), atol=1e-5)


def test_served_int8_scores_equal_iqa_score_quantize_int8(checkpoint, photos, tmp_path):
    """`iqa serve --quantize int8` (the real server, its worker loading the model) answers what `iqa score
    --quantize int8` writes, and not the float32 scores."""
    pytest.importorskip("fastapi", reason="the serve extra (pip install 'iqa-cli[serve]') is not installed")
    requests = pytest.importorskip("requests")
    from tests.test_serve import b64, serving

    out = tmp_path / "s.parquet"
    args = ["score", str(photos), "--out", str(out), "--model", str(checkpoint.path), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--dtype", "float32", "--quantize", "int8", "--quiet"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pandas().set_index("image")
    names = sorted(p.name for p in photos.glob("*.png"))
    with serving(checkpoint.path, "--quantize", "int8", "--max-batch", "4") as url:
        images = [b64((photos / name).read_bytes()) for name in names]
        response = requests.post(f"{url}/score", json={"images": images}, timeout=120)
    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["scores"])
    np.testing.assert_allclose(served, table.loc[names, "score"].to_numpy(), atol=1e-5, rtol=0)
    float32 = _scores(Scorer.from_pretrained(checkpoint.path, device="cpu", dtype="float32"), photos)
    assert np.abs(served - float32).max() > 1e-4


@pytest.mark.parametrize(
    ("mode", "device", "dtype", "fragments"),
    [
        ("int3", "cpu", torch.float32, ["--quantize int3", "int8, int4"]),
        ("int4", "cpu", torch.float32, ["--quantize int4 needs a CUDA device", "use --quantize int8"]),
        ("int4", "cuda", torch.float32, ["--quantize int4 runs in bfloat16", "float32", "--dtype bfloat16"]),
        ("int4", "cuda", torch.float16, ["float16"]),
    ],
)
def test_what_torchao_cannot_serve_is_a_one_line_error(mode, device, dtype, fragments):
    with pytest.raises(UserError) as caught:
        quantize.check(mode, torch.device(device), dtype)
    assert "\n" not in str(caught.value) and all(f in str(caught.value) for f in fragments), caught.value


def test_cli_refuses_int4_on_the_cpu_before_loading(checkpoint, photos, tmp_path):
    args = ["score", str(photos), "--out", str(tmp_path / "s.parquet"), "--model", str(checkpoint.path)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--quantize", "int4"])
    assert isinstance(result.exception, UserError) and "needs a CUDA device" in str(result.exception)
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_scores_on_cuda_follow_bfloat16(checkpoint, photos, mode):
    bf16 = Scorer.from_pretrained(checkpoint.path, device="cuda", dtype="bfloat16")
    quantized = Scorer.from_pretrained(checkpoint.path, device="cuda", dtype="bfloat16", quantize=mode)
    assert quantized.device.type == "cuda"
    a, b = _scores(bf16, photos), _scores(quantized, photos)
    assert np.abs(a - b).max() < 0.25 and spearmanr(a, b)[0] > 0.8
