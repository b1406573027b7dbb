"""The family processor's visual inputs of one image and their batching: the transform runs the processor on the
image token alone with the image (its pixel tensors and the ids the token expands to), the collate right-pads
rows; and Qwen-VL's pixel budget options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from iqa_cli.batch_buffer import batch_buffer
from iqa_cli.errors import UserError
from iqa_cli.models.backbone import VisualInputs
from iqa_cli.models.hf_vlm import DEFAULT_PIXELS, PATCH_GRID_FAMILIES

IMAGE_IDS = "image_ids"  # B, N: the ids the image token expands to, right-padded with -1
HAS_IMAGE = "has_image"  # B: 1 for a row holding an image (padding rows are 0)
TOKEN_TYPES = "mm_token_type_ids"  # Qwen-VL: 0 text, 1 image, per position (M-RoPE needs it)
TEXT_KEYS = ("input_ids", "attention_mask", TOKEN_TYPES, "token_type_ids")  # processor outputs over the text
FLAT_PIXELS = "pixel_values"  # Qwen-VL: [patches, D] per image, concatenated over images in the model call
GRID = "image_grid_thw"
VIDEO_PIXELS = "pixel_values_videos"  # the same for a video's frames (Qwen-VL: [patches, D]; LLaVA-OneVision: [F, ...])
VIDEO_GRID = "video_grid_thw"
VIDEO_TIMES = "second_per_grid_ts"  # Qwen2.5-VL: seconds per temporal patch of each video
# B: 1 where the slot's ids carry their own vision start/end pairs (Qwen3-VL's video: one pair per frame, each after
# its timestamp), so the pair the chat template wraps the slot in goes with the slot, as Qwen3VLProcessor collapses it
OWN_MARKERS = "own_vision_markers"


@dataclass(frozen=True)
class ProcessorTransform:
    """RGB PIL image -> the family processor's pixel tensors for it and the ids of its expanded image token;
    picklable for DataLoader workers."""

    processor: Any
    image_token: str
    flat: bool  # Qwen-VL: pixel_values without an image dimension
    images_kwargs: dict = field(default_factory=dict)  # Qwen-VL: {"size": {"shortest_edge": min, "longest_edge": max}}

    def __call__(self, image: Any) -> dict[str, torch.Tensor]:
        out = self.processor(
            text=[self.image_token],
            images=[image],
            add_special_tokens=False,
            return_tensors="pt",
            **self.images_kwargs,
        )
        return _one_item(out, flat=(FLAT_PIXELS,) if self.flat else ())


def _one_item(out: Any, flat: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The processor's output for one image or video -> a dataset item: the ids its slot expands to, the token
    types, and its tensors without the batch axis (the `flat` ones have none: all patches of a batch in one)."""
    item = {IMAGE_IDS: out["input_ids"][0]}
    if TOKEN_TYPES in out:
        item[TOKEN_TYPES] = torch.as_tensor(out[TOKEN_TYPES][0])
    for name, value in out.items():
        if name in TEXT_KEYS or not isinstance(value, torch.Tensor):
            continue
        item[name] = value if name in flat else value[0]
    return item


@dataclass(frozen=True)
class VideoTransform:
    """A video (`iqa_cli.video.Video`, or a list of its frames as RGB PIL images) -> the ids its slot expands to and
    the processor's tensors for it; picklable. `mode` "videos": the processor's own video input (`videos=`:
    Qwen2/2.5-VL, LLaVA-OneVision), the frames given as they were sampled (`do_sample_frames=False`) with where
    they came from (`video_metadata`: the video's frame rate and the sampled indices), and Qwen-VL's pixel budget
    per frame; "frames": the frames as that many images in the one slot (Idefics3).

    Qwen3-VL ("videos" with `timestamps`): the processor expands the video token to each temporal patch's
    `<t seconds>` and its own vision start/end pair, and the item says so (`OWN_MARKERS`: the splice drops the
    template's pair around the slot). Its video processor spreads the pixel budget over the whole clip unless
    `cap_pixels_per_frame` (the reference qwen-vl-utils' per-frame cap, which transformers will make its default),
    so `videos_kwargs` passes it; and it refuses fewer frames than a temporal patch, so a shorter clip's last frame
    (and index) is repeated up to one, which is the padding it gives a longer clip's last patch."""

    processor: Any
    image_token: str
    flat: bool
    mode: str  # "videos" | "frames"
    images_kwargs: dict = field(default_factory=dict)
    videos_kwargs: dict = field(default_factory=dict)  # Qwen3-VL: {"cap_pixels_per_frame": True}
    timestamps: bool = False  # Qwen3-VL: each temporal patch's time and vision markers written around its tokens

    def __call__(self, video: Any) -> dict[str, torch.Tensor]:
        frames = list(getattr(video, "frames", video))
        if not frames:
            raise ValueError("a video needs at least one frame")
        if self.mode == "frames":
            out = self.processor(text=[self.image_token * len(frames)], images=[frames], add_special_tokens=False,
                                 return_tensors="pt", **self.images_kwargs)  # fmt: skip
        else:
            indices = list(getattr(video, "indices", range(len(frames))))
            if self.timestamps:
                short = int(self.processor.video_processor.temporal_patch_size) - len(frames)
                frames, indices = frames + frames[-1:] * short, indices + indices[-1:] * short
            metadata = {"fps": float(getattr(video, "fps", 1.0)), "total_num_frames": getattr(video, "frame_count", 0)
                        or len(frames), "frames_indices": indices}  # fmt: skip
            out = self.processor(text=[self.processor.video_token], videos=[frames], add_special_tokens=False,
                                 return_tensors="pt", do_sample_frames=False, video_metadata=[metadata],
                                 **self.images_kwargs, **self.videos_kwargs)  # fmt: skip
        item = _one_item(out, flat=(FLAT_PIXELS, VIDEO_PIXELS) if self.flat else ())
        if self.timestamps:
            item[OWN_MARKERS] = torch.ones((), dtype=torch.int8)
        return item


@dataclass(frozen=True)
class PaddedCollate:
    """Per-image tensors -> batch-first tensors zero-padded to the largest in every dimension (image ids padded
    with -1), plus `has_image`; every key keeps its rows first, as the scoring pipeline slices batches by row. A key
    some items lack (a video's, in a training batch mixing images and videos) is zeros in their rows."""

    def __call__(
        self, items: list[VisualInputs | None], batch_size: int, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        present = [item for item in items if item is not None]
        if not present:  # a batch of failed images only: one empty row shape the forward never reaches
            return {
                IMAGE_IDS: torch.full((batch_size, 1), -1, dtype=torch.long),
                HAS_IMAGE: torch.zeros(batch_size, dtype=torch.int8),
            }
        out: dict[str, torch.Tensor] = {}
        names = list(dict.fromkeys(name for item in present for name in item))
        for name in names:
            having = [item[name] for item in present if name in item]
            first = having[0]
            shape = [max(value.shape[d] for value in having) for d in range(first.dim())]
            cast = dtype if first.is_floating_point() else first.dtype
            batch = batch_buffer((batch_size, *shape), cast)
            batch.fill_(-1 if name == IMAGE_IDS else 0)
            for row, item in enumerate(items):
                if item is not None and name in item:
                    value = item[name]
                    batch[(row, *(slice(0, s) for s in value.shape))] = value
            out[name] = batch
        out[HAS_IMAGE] = torch.tensor(
            [item is not None for item in items] + [False] * (batch_size - len(items)), dtype=torch.int8
        )
        return out


def pixel_options(model_type: str, min_pixels: int | None, max_pixels: int | None, patch: int) -> dict:
    """Qwen-VL's pixel budget: default the papers' fixed 448x448, else the user's bounds (at least one merged
    patch, min <= max)."""
    if model_type not in PATCH_GRID_FAMILIES:
        if min_pixels is not None or max_pixels is not None:
            raise UserError(f"--min-pixels / --max-pixels apply to {', '.join(PATCH_GRID_FAMILIES)}, not {model_type}")
        return {}
    if min_pixels is None and max_pixels is None:
        min_pixels = max_pixels = DEFAULT_PIXELS
    smallest = patch * patch
    for flag, value in (("--min-pixels", min_pixels), ("--max-pixels", max_pixels)):
        if value is not None and value < smallest:
            raise UserError(f"{flag} {value} is below one {patch}x{patch} patch of {model_type} ({smallest} pixels)")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise UserError(f"--min-pixels {min_pixels} is above --max-pixels {max_pixels}")
    bounds = {k: v for k, v in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)) if v is not None}
    return {"size": bounds}  # Qwen2VLImageProcessor's pixel-count bounds


def patch_grid_tensor_inputs(
    image: torch.Tensor, image_processor: Any, images_kwargs: dict, image_token_id: int, token_types: bool
) -> dict[str, torch.Tensor]:
    """Qwen-VL's image processor in torch: one [3, H, W] float RGB image in [0, 1] (any device, autograd kept) ->
    the same keys and layout `ProcessorTransform` gives (`pixel_values` [patches, C * T * P * P], `image_grid_thw`,
    the expanded image ids), plus `has_image`.

    The same steps: transformers' own `smart_resize` picks the size (pixel budget, multiple of patch * merge),
    bicubic antialiased resize, rescale, normalize, then the patch flattening of `Qwen2VLImageProcessor.patchify`
    (merge-window order, each patch repeated over the temporal axis). One departure: the resize runs in float
    (nothing rounded to uint8, so gradients flow); at the target size no resize runs and the pixels are the
    processor's (tests/test_hf_vlm_tensors.py measures both)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    ip = image_processor
    patch, merge, temporal = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    x = image.float()
    height, width = x.shape[1:]
    if ip.do_resize:
        bounds = dict(images_kwargs.get("size") or {})
        low = bounds.get("shortest_edge", ip.size.shortest_edge)
        high = bounds.get("longest_edge", ip.size.longest_edge)
        height, width = smart_resize(height, width, factor=patch * merge, min_pixels=low, max_pixels=high)
        x = _resize(x, (height, width))
    x = _rescale_normalize(x, ip)
    gh, gw = height // patch, width // patch
    patches = x.reshape(3, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    flat = patches.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1).reshape(gh * gw, -1)
    n = gh * gw // (merge * merge)
    device = x.device
    out = {
        IMAGE_IDS: torch.full((n,), image_token_id, dtype=torch.long, device=device),
        FLAT_PIXELS: flat,
        GRID: torch.tensor([1, gh, gw], dtype=torch.long, device=device),
        HAS_IMAGE: torch.ones((), dtype=torch.int8, device=device),
    }
    if token_types:
        out[TOKEN_TYPES] = torch.ones(n, dtype=torch.long, device=device)
    return out


def anyres_tensor_inputs(image: torch.Tensor, processor: Any, image_token_id: int) -> dict[str, torch.Tensor]:
    """LLaVA-OneVision's anyres image processor in torch: one [3, H, W] float RGB image in [0, 1] -> the keys
    `ProcessorTransform` gives (`pixel_values` [1 + crops, 3, S, S], `image_sizes`, `batch_num_images`, the
    expanded image ids), plus `has_image`.

    The same steps: transformers' `select_best_resolution` over the grid pinpoints, an aspect-keeping resize
    (`get_patch_output_size`) and centred zero padding to it, crops of the crop size in row order after the
    whole image resized to the base size, rescale, normalize; the token count is the processor's own
    `_get_number_of_features`. The resize runs in float, as in `patch_grid_tensor_inputs`."""
    import torch.nn.functional as F
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    ip = processor.image_processor
    x = image.float()
    height, width = x.shape[1:]
    size = (ip.size.height, ip.size.width) if ip.size.height else (ip.size.shortest_edge, ip.size.shortest_edge)
    crop = ip.crop_size.height if ip.crop_size and ip.crop_size.height else size[0]
    best = select_best_resolution((height, width), ip.image_grid_pinpoints)
    new_h, new_w = get_patch_output_size(x, best, ChannelDimension.FIRST)
    padded = _resize(x, (new_h, new_w))
    left, top = (best[1] - new_w) // 2, (best[0] - new_h) // 2
    padded = F.pad(padded, (left, best[1] - new_w - left, top, best[0] - new_h - top))
    crops = [padded[:, i : i + crop, j : j + crop] for i in range(0, best[0], crop) for j in range(0, best[1], crop)]
    pixels = torch.stack([_resize(view, size) for view in [_resize(x, size), *crops]])
    pixels = _rescale_normalize(pixels, ip)
    n = processor._get_number_of_features(height, width, *size)
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    device = x.device
    return {
        IMAGE_IDS: torch.full((n,), image_token_id, dtype=torch.long, device=device),
        FLAT_PIXELS: pixels,
        "image_sizes": torch.tensor([height, width], dtype=torch.long, device=device),
        "batch_num_images": torch.ones((), dtype=torch.long, device=device),
        HAS_IMAGE: torch.ones((), dtype=torch.int8, device=device),
    }


def _rescale_normalize(x: torch.Tensor, ip: Any) -> torch.Tensor:
    """Floats in [0, 1] [..., 3, H, W] -> what the image processor feeds the model: its rescale and its
    mean/std, applied to the 0-255 values as the processor applies them."""
    x = x * 255
    if ip.do_rescale:
        x = x * ip.rescale_factor
    if ip.do_normalize:
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        x = (x - mean) / std
    return x


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] in [0, 1] -> [3, *size], bicubic antialiased as torchvision's uint8 kernel runs it: the width pass,
    then the height pass, clamping in between (one 2-D pass differs by up to ~17 uint8 steps on upscaled noise,
    these two by about 1); a pass whose side does not change is skipped, so a no-op resize changes nothing."""
    import torch.nn.functional as F

    for step in ((x.shape[1], size[1]), tuple(size)):
        if tuple(step) != tuple(x.shape[1:]):
            x = F.interpolate(x[None], size=step, mode="bicubic", antialias=True)[0].clamp(0, 1)
    return x


def tensor_collate(rows: list[dict[str, torch.Tensor]], batch_size: int) -> dict[str, torch.Tensor]:
    """`PaddedCollate` for `score_tensors`: rows zero-padded to the largest in every dimension (image ids with -1)
    and `batch_size - len(rows)` rows without an image, by `F.pad` and `torch.cat`, so autograd is kept."""
    import torch.nn.functional as F

    out: dict[str, torch.Tensor] = {}
    for name, first in rows[0].items():
        shape = [max(row[name].shape[d] for row in rows) for d in range(first.dim())]
        fill = -1 if name == IMAGE_IDS else 0
        padded = []
        for row in rows:
            value = row[name]
            widths = [w for d in reversed(range(value.dim())) for w in (0, shape[d] - value.shape[d])]
            padded.append(F.pad(value, widths, value=fill) if any(widths) else value)
        extra = first.new_full((batch_size - len(rows), *shape), fill)
        out[name] = torch.cat([torch.stack(padded), extra])
    return out
