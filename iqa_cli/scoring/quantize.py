"""Weight-only 8- and 4-bit quantization of a loaded model through torchao (`--quantize int8|int4`).

Every `nn.Linear` except the LM head and a score regressor is replaced, one module at a time, by torchao's
quantized weight (activations stay in the model's dtype); the LM head is kept, as bitsandbytes' 8-bit loading
keeps it (pyiqa's `qalign_8bit`), because the level readout reads it directly, and Q-Scorer's MLP because it
outputs the score (in float32, which torchao's int4 would refuse). For a GPU the model is loaded on the CPU
and each layer is moved and quantized in turn, so the GPU never holds more than the quantized model plus
one layer in the load dtype.

What torchao 0.18 serves (checked with torch 2.14.1):
- int8: `Int8WeightOnlyConfig` (per-row symmetric scales) on the CPU and CUDA, in any float dtype.
- int4: `Int4WeightOnlyConfig` with the tile-packed (tinygemm) layout, CUDA and bfloat16 only, on GPUs of
  compute capability 8.0 and newer (the kernel's bf16 tensor-core instructions). On the CPU its
  packed layouts need the `mslk` kernels (not installable here) or a GPU; `IntxWeightOnlyConfig(int4)` runs
  on the CPU but stores each 4-bit value in a byte (int8 memory), which defeats the point, so int4 on the
  CPU is refused.
"""

from __future__ import annotations

import torch

from iqa_cli.errors import UserError
from iqa_cli.model_options import QUANTIZE_MODES as MODES

INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides a layer's input size is used


def check(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """One-line errors for what torchao cannot serve, before any weight is loaded."""
    if mode not in MODES:
        raise UserError(f"--quantize {mode}: use one of {', '.join(MODES)}")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise UserError("--quantize needs torchao: pip install torchao (or pip install -e '.[quantize]')") from None
    if mode == "int4" and device.type != "cuda":
        raise UserError(
            f"--quantize int4 needs a CUDA device (torchao's packed int4 kernels; the device is {device.type}); "
            "use --quantize int8 on the CPU"
        )
    if mode == "int4" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(
            f"--quantize int4 needs a GPU of compute capability 8.0 or newer (Ampere: torchao's bfloat16 int4 "
            f"kernel); {device} is {major}.{minor}; use --quantize int8"
        )
    if mode == "int4" and dtype != torch.bfloat16:
        raise UserError(
            f"--quantize int4 runs in bfloat16 (torchao's tile-packed int4 kernel), not {str(dtype)[6:]}; "
            "pass --dtype bfloat16 or auto"
        )


def load_device(mode: str | None, device: torch.device) -> torch.device:
    """Where to load the float weights: the CPU when they are quantized for a GPU afterwards."""
    return torch.device("cpu") if mode is not None else device


def kept_in_float(model: torch.nn.Module) -> set[str]:
    """Names of the Linear layers left as they are: the LM head (the level logits are read from it) and every layer
    of a score regressor (Q-Scorer's MLP: it outputs the score, and it is kept in float32)."""
    from iqa_cli.models.score_regressor import ScoreRegressor

    head_getter = getattr(model, "get_output_embeddings", None)
    head = head_getter() if callable(head_getter) else None
    kept: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, ScoreRegressor) or module is head or name.rsplit(".", 1)[-1] == "lm_head":
            kept.update(f"{name}.{inner}" if inner else name for inner, _ in module.named_modules())
    return kept


def quantize_model(model: torch.nn.Module, mode: str, device: torch.device) -> list[str]:
    """Quantizes every Linear except those `kept_in_float` in place, moving each to `device` first; then moves
    the rest.

    Returns the names of Linear layers left in float because of their shape (an input size no int4 group size
    divides).
    """
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    skipped = []
    kept = kept_in_float(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name in kept:
            continue
        if mode == "int8":
            config = Int8WeightOnlyConfig()
        else:
            group = next((g for g in INT4_GROUP_SIZES if module.in_features % g == 0), None)
            if group is None or module.out_features % 8:
                skipped.append(name)
                continue
            config = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
        module.to(device)
        quantize_(module, config, filter_fn=lambda m, _, target=module: m is target)
        if device.type == "cpu":
            _release_freed_memory()
    model.to(device)
    return skipped


def _release_freed_memory() -> None:
    """Hands the heap freed by quantizing's temporaries back to the system (glibc keeps it otherwise)."""
    import contextlib
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
