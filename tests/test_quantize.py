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


def test_int4_on_a_gpu_older_than_ampere_is_refused_before_loading(monkeypatch):
    """A V100 (7.0) or T4 (7.5) has no bf16 tensor cores for torchao's int4 kernel; `--dtype auto` gives float16
    there, so the refusal must name the GPU, not the dtype."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(UserError, match=r"compute capability 8\.0 or newer.*cuda:0 is 7\.5.*--quantize int8"):
            quantize.check("int4", torch.device("cuda", 0), dtype)
    quantize.check("int8", torch.device("cuda", 0), torch.float16)  # int8 runs there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    quantize.check("int4", torch.device("cuda", 0), torch.bfloat16)


def _linear_names(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def test_int4_quantizes_only_bfloat16_layers_never_the_regressor_or_the_lm_head(tmp_path, monkeypatch):
    """A transformers-family Q-Scorer in bf16: its MLP regressor is float32 (torchao's int4 asserts "Only bfloat16
    is supported" on it) and, like the LM head, outputs what is read, so both stay as they are. torchao's
    `quantize_` is recorded here instead of run (its int4 kernels need a GPU): what it would be handed."""
    import torchao.quantization

    from iqa_cli.models.backbone import load_backbone
    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    backbone = load_backbone(tiny_checkpoint("qwen2_vl", tmp_path / "qwen"), dtype=torch.bfloat16, device="cpu")
    backbone.add_regressor([16, 16])
    model = backbone.model
    handed: dict[str, torch.dtype] = {}
    names = {id(module): name for name, module in model.named_modules()}

    def record(module, config, filter_fn=None):
        handed[names[id(module)]] = module.weight.dtype

    monkeypatch.setattr(torchao.quantization, "quantize_", record)
    skipped = quantize.quantize_model(model, "int4", torch.device("cpu"))
    regressor = {n for n in _linear_names(model) if n.startswith("iqa_regressor.")}
    assert len(regressor) == 3 and "lm_head" in _linear_names(model)
    assert quantize.kept_in_float(model) & _linear_names(model) == regressor | {"lm_head"}
    assert set(handed) | set(skipped) == _linear_names(model) - regressor - {"lm_head"}
    assert set(handed) and set(handed.values()) == {torch.bfloat16}
    assert {p.dtype for p in backbone.regressor.parameters()} == {torch.float32}


def test_int8_leaves_the_mplug_owl2_regressor_in_float(tmp_path):
    """The same rule for the native family: Q-Scorer's `deepmlp` keeps its float weights, the rest is int8."""
    from tests.factories import tiny_config, tiny_model

    model = tiny_model(seed=3, config=tiny_config(deepmlp_hidden_dims=[32, 32]))
    quantize.quantize_model(model, "int8", torch.device("cpu"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n for n in linears if n.startswith("deepmlp.") or n.endswith("lm_head")}
    assert len(kept) == 4 and {type(linears[n].weight).__name__ for n in kept} == {"Parameter"}
    assert {type(m.weight).__name__ for n, m in linears.items() if n not in kept} == {"Int8Tensor"}
