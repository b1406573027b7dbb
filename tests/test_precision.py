"""The dtype `--dtype auto` picks for each kind of GPU (simulated capabilities) and float32 meaning float32 on a
GPU (TF32 off), checked through `Scorer.from_pretrained` on the tiny checkpoint."""

import pytest
import torch

from iqa_cli.scoring.scorer import Scorer, resolve_dtype


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_auto_is_bfloat16_only_where_the_gpu_computes_in_it(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) report bf16 as supported (emulated, far slower): auto gives float16 there."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16  # asked for: as asked
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.fixture
def tf32_on():
    """TF32 allowed for matrix products and cuDNN, as a user's code (or cuDNN's default) may leave it; the
    settings are put back afterwards (they are process-wide)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _checkpoint(tmp_path):
    from iqa_cli.models.mplug_owl2.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path / "tiny", image_size=28)


def test_float32_scoring_turns_tf32_off(tmp_path, tf32_on):
    Scorer.from_pretrained(_checkpoint(tmp_path), device="cpu", dtype="float32")
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 is False  # the vision tower's patch convolution


def test_other_dtypes_leave_the_tf32_settings_alone(tmp_path, tf32_on):
    Scorer.from_pretrained(_checkpoint(tmp_path), device="cpu", dtype="bfloat16")
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
