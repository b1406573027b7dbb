"""`benchmarks/gpu_check.py --dry-run`: every section of the lent-GPU check runs on the CPU with the tiny models,
so the first GPU call does not fail on a typo (the GPU-only steps, int4 and the memory fraction, say so)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ONE_THREAD, REPO_ROOT


@pytest.mark.slow
def test_gpu_check_runs_every_section_on_the_cpu():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=480, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert all(len(row) == 3 for row in rows), rows  # one table: no cell holds a '|'
    checks = {(row[0].strip("| "), row[1]) for row in rows[1:]}
    assert not [row for row in rows if "FAILED" in row[2] or "skipped: time" in row[2]]
    assert any(s == "gpu tests" and c.startswith("pytest -m gpu (") for s, c in checks)
    assert {c for s, c in checks if s == "float32 vs CPU"} == {
        "mplug_owl2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "idefics3",
    }  # fmt: skip
    assert len([c for s, c in checks if s == "bf16 invariance"]) == 4
    for name in ("mplug-owl2 bf16", "mplug-owl2 int8", "qwen2.5-vl bf16", "qwen2.5-vl int8"):
        assert {("7B scoring", f"{name}, iqa score batch {b}") for b in (2, 4)} <= checks, name
    assert ("7B scoring", "mplug-owl2 bf16, --batch-size auto") in checks
    assert ("7B scoring", "mplug-owl2 bf16, iqa serve one image") in checks
    assert ("7B scoring", "qwen2.5-vl int4") in checks  # "skipped: int4 needs CUDA (dry run)"
    assert {c for s, c in checks if s == "training"} >= {"tiny mPLUG-Owl2 deqa full, FSDP2 one rank"}
    assert any(s == "serve" for s, _ in checks)
    assert proc.stdout.rstrip().endswith("0 failed")


def test_the_qwen25_vl_7b_config_builds_the_released_models_shapes(tmp_path, monkeypatch):
    """The GPU run builds Qwen2.5-VL-7B from `qwen25_7b_config`, which `--dry-run` never calls (it keeps the tiny
    sizes): built here on the meta device, its language model has the parameters a hand count of the 7B's sizes
    gives, and the whole model the released checkpoint's 8,292,166,656."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from iqa_cli.models.hf_vlm.tiny import tiny_checkpoint

    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks its module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts benchmarks/ on the path for its own imports
    spec.loader.exec_module(gpu_check)
    tiny = AutoConfig.from_pretrained(tiny_checkpoint("qwen2_5_vl", tmp_path / "tiny"))
    config = gpu_check.qwen25_7b_config(tiny)
    assert config.image_token_id == tiny.image_token_id  # the tiny tokenizer's ids reach the model
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    hidden, mlp, layers, vocab, kv = 3584, 18944, 28, 152064, 512  # 4 key/value heads of 128
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * mlp + 2 * hidden
    language = sum(p.numel() for p in model.model.language_model.parameters())
    assert language == layers * layer + vocab * hidden + hidden  # layers, embeddings, final norm
    assert tuple(model.lm_head.weight.shape) == (vocab, hidden)  # not tied
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656
