"""Any transformers vision-language model (Qwen2/2.5/3-VL, LLaVA-OneVision, Idefics3) as a `Backbone`.

Only transformers' own classes are used (`AutoModelForImageTextToText`, `AutoProcessor`), never remote code;
the family's processor makes the visual inputs and its chat template renders the prompt. Constants here are
importable without torch; `OPTIONS` are this family's own model options (`iqa_cli.model_options`).
"""

import math

from iqa_cli.errors import UserError
from iqa_cli.model_options import ModelOption

# config.json model_type -> the placeholder a prompt holds once (the processor's `image_token`)
IMAGE_TOKENS = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "qwen3_vl": "<|image_pad|>",
    "llava_onevision": "<image>",
    "idefics3": "<image>",
}
# Families whose processor concatenates the patches of all images into one [sum of patches, D] tensor and
# describes each image by a (t, h, w) grid; `--max-pixels` / `--min-pixels` apply to them.
PATCH_GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEFAULT_PIXELS = 448 * 448  # Qwen-VL: a fixed budget like the papers' 448x448 input (min = max = this)
# How a family takes a video's sampled frames: its processor's video input, or the frames as images in the slot.
# Qwen3-VL's video input writes each temporal patch's timestamp and its own vision start/end pair; its ids replace
# the template's pair around the slot too, as Qwen3VLProcessor collapses it (`HFVisionLanguageBackbone._splice`).
VIDEO_MODES = {
    "qwen2_vl": "videos",
    "qwen2_5_vl": "videos",
    "qwen3_vl": "videos",
    "llava_onevision": "videos",
    "idefics3": "frames",
}
# The language model's linear layers LoRA adapts by default (attention and MLP projections of every decoder layer).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TRAIN_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
_SIDE = math.isqrt(DEFAULT_PIXELS)  # the options' help

OPTIONS = (
    ModelOption(
        "min_pixels",
        f"Qwen-VL: fewest pixels an image is resized to [default: {_SIDE}x{_SIDE} (the papers' fixed input), for "
        "reasoning models and --method grpo too; their authors ran Qwen's native 3136].",
        kind=int,
        metavar="N",
        minimum=1,
    ),
    ModelOption(
        "max_pixels",
        f"Qwen-VL: most pixels an image is resized to [default: {_SIDE}x{_SIDE} (the papers' fixed input), for "
        "reasoning models and --method grpo too; their authors ran Qwen's native 12845056].",
        kind=int,
        metavar="N",
        minimum=1,
    ),
)


def check_options(values: dict) -> None:
    """What the flags alone can tell: the pixel budget's bounds in order (its patch size is checked at load)."""
    low, high = values.get("min_pixels"), values.get("max_pixels")
    if low is not None and high is not None and low > high:
        raise UserError(f"--min-pixels {low} is above --max-pixels {high}")
