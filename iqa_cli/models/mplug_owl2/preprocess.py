"""CLIP preprocessing of mPLUG-Owl2 with the reference's pixel values.

The reference pads to a square filled with the CLIP mean colour (`expand2square`, DeQA-Score `src/mm_utils.py`)
and runs transformers' slow, PIL-based `CLIPImageProcessor` (bicubic shortest-edge resize, center crop,
x/255, (x - mean)/std). `ClipPreprocessor` reproduces those numbers without transformers; torchvision-based
fast processors resize differently and are not used. Decoding (`iqa_cli.images.load_image`) comes before.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.files import read_json_object

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def expand_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Pads the short side to a square filled with `color`, the image centered with the reference's offset
    `(long - short) // 2` (`expand2square`, DeQA-Score `src/mm_utils.py`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


@dataclass(frozen=True)
class ClipPreprocessor:
    """CLIP preprocessing as transformers' slow `CLIPImageProcessor` computes it, after the reference's padding.

    The default is the released checkpoints' `preprocessor_config.json` (448 px, OpenAI CLIP mean/std).
    Frozen and picklable, so DataLoader workers can carry it.
    """

    size: int | tuple[int, int] = 448  # int: shortest edge; (height, width): exact output of the resize
    crop_size: tuple[int, int] = (448, 448)  # (height, width) of the center crop
    resample: int = 3  # PIL resampling filter; 3 = bicubic
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    pad_to_square: bool = True  # the reference's `image_aspect_ratio="pad"`

    def __post_init__(self) -> None:
        if self.image_size is None:
            raise ValueError("preprocessing must produce a square image (set a square crop_size)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values")

    @classmethod
    def from_config(cls, source: str | Path | dict[str, Any]) -> ClipPreprocessor:
        """From a `preprocessor_config.json` (or the directory holding it, or its parsed dict), with
        `CLIPImageProcessor`'s defaults for missing keys."""
        if isinstance(source, dict):
            config, where = source, "preprocessor config"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / PREPROCESSOR_CONFIG
            where = str(path)
            if not path.is_file():
                raise UserError(f"image preprocessor config not found: {path}")
            config = read_json_object(path)
        try:
            return cls(
                size=_size_option(config.get("size", {"shortest_edge": 224})),
                crop_size=_crop_option(config.get("crop_size", {"height": 224, "width": 224})),
                resample=int(config.get("resample", 3)),
                image_mean=_triple(config.get("image_mean", OPENAI_CLIP_MEAN)),
                image_std=_triple(config.get("image_std", OPENAI_CLIP_STD)),
                do_resize=bool(config.get("do_resize", True)),
                do_center_crop=bool(config.get("do_center_crop", True)),
                do_rescale=bool(config.get("do_rescale", True)),
                rescale_factor=float(config.get("rescale_factor", 1 / 255)),
                do_normalize=bool(config.get("do_normalize", True)),
                pad_to_square=config.get("image_aspect_ratio", "pad") == "pad",
            )
        except (TypeError, ValueError, KeyError) as err:
            raise UserError(f"{where}: unsupported image preprocessing settings: {err}") from None

    def to_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` keys (CLIPImageProcessor's) for this preprocessing."""
        if isinstance(self.size, int):
            size = {"shortest_edge": self.size}
        else:
            size = {"height": self.size[0], "width": self.size[1]}
        return {
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": True,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": size,
        }

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PREPROCESSOR_CONFIG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_config(), indent=2) + "\n", encoding="utf-8")
        return path

    @property
    def image_size(self) -> int | None:
        """Side S of the square pixel_values (None if the settings give a non-square output)."""
        if self.do_center_crop:
            height, width = self.crop_size
            return height if height == width else None
        if self.do_resize:
            if isinstance(self.size, int):
                return self.size if self.pad_to_square else None
            height, width = self.size
            return height if height == width else None
        return None

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The padding colour, `tuple(int(x * 255) for x in image_mean)` as in the reference: (122, 116, 104)."""
        return tuple(int(x * 255) for x in self.image_mean)  # type: ignore[return-value]

    def __call__(self, image: Image.Image):
        """RGB PIL image -> FloatTensor[3, S, S]."""
        import torch

        return torch.from_numpy(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array [3, S, S] (C, H, W)."""
        hwc = self.uint8_pixels(image)
        lut = self.value_table()
        out = np.empty((3, *hwc.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(lut[c], hwc[..., c], out=out[c])
        return out

    def uint8_pixels(self, image: Image.Image, *, fast: bool = False) -> np.ndarray:
        """RGB PIL image -> uint8 array [S, S, 3] (H, W, C), padded, resized and cropped: `pixels` before the
        value table, a quarter of the bytes for a DataLoader worker to hand over. `fast` (`--fast-decode`):
        the resize is torch's (`_fast_resize`), not Pillow's pixels."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        hwc = None
        if fast and self.do_resize and self.resample in _TORCH_FILTERS:
            hwc = self._fast_resize(image, _TORCH_FILTERS[self.resample])
        elif self.do_resize and self.pad_to_square and self.resample != Image.Resampling.NEAREST:
            if width > height:
                hwc = self._resize_landscape_padded(image)
            elif height > width:
                hwc = self._resize_portrait_padded(image)
        if hwc is None:
            if self.pad_to_square:
                image = expand_to_square(image, self.pad_color)
            if self.do_resize:
                new_height, new_width = self.resize_shape(image.size)
                # Pillow returns a copy when the size is unchanged, as transformers' call does.
                image = image.resize((new_width, new_height), resample=Image.Resampling(self.resample))
            hwc = np.asarray(image)  # H, W, 3 uint8
        if self.do_center_crop:
            hwc = _center_crop(hwc, self.crop_size)
        return hwc if hwc.flags.writeable else hwc.copy()  # Pillow's arrays are read-only; torch wants writable

    def _fast_resize(self, image: Image.Image, mode: str) -> np.ndarray:
        """Pad and resize through torch's antialiased uint8 filter (vectorized; ~6x Pillow's on a 1024 px square).
        It follows Pillow's filter but rounds its fixed-point coefficients otherwise: on the same input, 1 grey
        level apart at about 0.3% of the values, never more (tests/test_fast_decode.py)."""
        import torch
        import torch.nn.functional as F

        width, height = image.size
        if self.pad_to_square and width != height:
            side = max(width, height)
            hwc = np.empty((side, side, 3), dtype=np.uint8)
            hwc.reshape(side, side * 3)[...] = np.tile(np.asarray(self.pad_color, dtype=np.uint8), side)  # by rows
            top, left = (side - height) // 2, (side - width) // 2  # expand_to_square's offsets
            hwc[top : top + height, left : left + width] = np.asarray(image)
        else:
            hwc = np.array(image)
        new_height, new_width = self.resize_shape((hwc.shape[1], hwc.shape[0]))
        if (new_height, new_width) == hwc.shape[:2]:
            return hwc
        nchw = torch.from_numpy(hwc).permute(2, 0, 1)[None]  # channels-last strides: the vectorized kernel
        resized = F.interpolate(nchw, size=(new_height, new_width), mode=mode, antialias=True)
        return resized[0].permute(1, 2, 0).numpy()

    def _resize_landscape_padded(self, image: Image.Image) -> np.ndarray:
        """The padded square's resize without the padding rows' share of the work, bit-identical.

        Pillow's resize is separable: a horizontal pass (rows, rounded to uint8) then a vertical one, each with
        coefficients that depend only on the sizes. A padding row is one constant colour, so its horizontal
        pass is the same for every such row (`_padding_row`); the image's rows give what they give inside the
        square. Only the vertical pass sees the whole square (tests/test_preprocess.py checks every case).
        """
        width, height = image.size  # width > height: the padding is rows above and below
        new_height, new_width = self.resize_shape((width, width))
        resample = Image.Resampling(self.resample)
        square = Image.new("RGB", (new_width, width))  # assembled in Pillow: no round trip through numpy
        top, bottom = (width - height) // 2, width - height - (width - height) // 2
        for y, rows in ((0, top), (top + height, bottom)):
            if rows:
                square.paste(_padding_block(width, new_width, rows, self.pad_color, self.resample), (0, y))
        square.paste(image.resize((new_width, height), resample=resample), (0, top))  # horizontal pass only
        return np.asarray(square.resize((new_width, new_height), resample=resample))  # vertical

    def _resize_portrait_padded(self, image: Image.Image) -> np.ndarray | None:
        """The padded square's resize without the right-hand padding columns' work, bit-identical; None when no
        column can be skipped.

        The padding is columns here, which every row's horizontal pass reads, so the image is not resized alone.
        An output column whose filter window holds only padding is the padding row's value in every row after
        the horizontal pass, and the vertical pass of such a column depends on that value alone
        (`_padding_columns`, cached per size). Pillow computes the others when asked for the square's left part
        through `box`: its coefficients come from the box's float32 edges and width / output width in float64,
        so they are the square's when the box starts at 0 and its right edge `columns * side / new_width` is a
        whole pixel (`_portrait_columns`). A box starting inside the square would move the filter centers by a
        rounding, so the left-hand padding columns are computed, not skipped.
        """
        width, height = image.size  # height > width: the padding is columns left and right
        side = height
        new_height, new_width = self.resize_shape((side, side))
        left = (side - width) // 2
        columns, box_right, reach = _portrait_columns(side, new_width, left + width, self.resample)
        if columns >= new_width or side == new_width:
            return None
        resample = Image.Resampling(self.resample)
        canvas = Image.new("RGB", (max(box_right, min(side, reach)), side), self.pad_color)  # what the columns read
        canvas.paste(image, (left, 0))
        part = canvas.resize((columns, new_height), resample=resample, box=(0, 0, box_right, side))
        square = np.empty((new_height, new_width, 3), dtype=np.uint8)
        square[:, :columns] = np.asarray(part)
        square[:, columns:] = _padding_columns(side, new_width, new_height, columns, self.pad_color, self.resample)
        return square

    def draft_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest (width, height) an image of `image_size` may be decoded at for `--fast-decode`: the
        padded square's side stays >= the side it is resized to, so the resize still only shrinks (the long side
        >= that side, the short side free). Without padding the short side must stay >= `size`. None when the
        pixels' exact size matters (no resize)."""
        if not self.do_resize:
            return None
        width, height = image_size
        if self.pad_to_square:
            side = max(self.resize_shape((1, 1)))  # the square's side after the resize
            return (side, 1) if width >= height else (1, side)
        target = self.size if isinstance(self.size, int) else max(self.size)
        return (target, target)

    def resize_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) after the resize, rounded as transformers' `get_resize_output_image_size`:
        the short side becomes `size`, the long side `int(size * long / short)`."""
        if not isinstance(self.size, int):
            return self.size
        width, height = image_size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def tensor_pixels(self, image):
        """[3, H, W] float RGB in [0, 1] (any device, autograd kept) -> [3, S, S]: `pixels` in torch, no PIL.

        The same steps (pad to a square of the mean colour, shortest-edge resize, center crop, rescale,
        normalize) with two departures: nothing is rounded to uint8 (so gradients flow), and the resize is
        torch's antialiased bicubic, which follows Pillow's filter but not its two uint8 roundings
        (tests/test_score_tensors.py measures the difference in scores).
        """
        import torch
        import torch.nn.functional as F

        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
        x = image.float()
        _, height, width = x.shape
        if self.pad_to_square and height != width:
            side = max(height, width)
            top, left = (side - height) // 2, (side - width) // 2
            color = torch.tensor(self.pad_color, dtype=x.dtype, device=x.device).view(3, 1, 1) / 255
            x = F.pad(x - color, (left, side - width - left, top, side - height - top)) + color
        if self.do_resize:
            new_height, new_width = self.resize_shape((x.shape[2], x.shape[1]))
            if (new_height, new_width) != tuple(x.shape[1:]):
                x = F.interpolate(x[None], size=(new_height, new_width), mode="bicubic", antialias=True)[0]
            x = x.clamp(0, 1)  # Pillow's result is uint8
        if self.do_center_crop:
            crop_h, crop_w = self.crop_size
            height, width = x.shape[1:]
            pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)  # zeros where the image is smaller
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            top, left = (x.shape[1] - crop_h) // 2, (x.shape[2] - crop_w) // 2
            x = x[:, top : top + crop_h, left : left + crop_w]
        x = x * (255 * self.rescale_factor) if self.do_rescale else x * 255
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=x.dtype, device=x.device).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def value_table(self) -> np.ndarray:
        """[3, 256] float32: the output for each uint8 value, by transformers' arithmetic (x * factor in
        float64 cast to float32, then (x - mean) / std in float32), so a table lookup is bit-identical."""
        values = np.arange(256, dtype=np.uint8)
        scaled = (values * self.rescale_factor).astype(np.float32) if self.do_rescale else values.astype(np.float32)
        table = np.repeat(scaled[None, :], 3, axis=0)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            table = (table - mean) / std
        return table


_TORCH_FILTERS = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}


@functools.lru_cache(maxsize=16)
def _padding_row(width: int, new_width: int, color: tuple[int, int, int], resample: int) -> np.ndarray:
    """A padding row of the square after the horizontal pass: [new_width, 3] uint8."""
    row = Image.new("RGB", (width, 1), color).resize((new_width, 1), resample=Image.Resampling(resample))
    return np.asarray(row)[0]


@functools.lru_cache(maxsize=16)
def _padding_block(width: int, new_width: int, rows: int, color: tuple[int, int, int], resample: int) -> Image.Image:
    """`rows` padding rows after the horizontal pass, as a Pillow image to paste (only ever read)."""
    row = _padding_row(width, new_width, color, resample)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (rows, new_width, 3))))


# Pillow's filter supports (src/libImaging/Resample.c), by resampling filter number.
_FILTER_SUPPORT = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}  # lanczos, bilinear, bicubic, box, hamming


@functools.lru_cache(maxsize=64)
def _portrait_columns(side: int, new_width: int, image_end: int, resample: int) -> tuple[int, int, int]:
    """(columns, box_right, reach) for the horizontal resize of a padded square `side` wide to `new_width`:
    output columns from `columns` on read only padding (input columns >= `image_end`, with one column to
    spare), `columns` is a multiple of new_width / gcd, so that `box_right = columns * side / new_width` is a
    whole pixel, and the first `columns` outputs read input columns below `reach`. Pillow's window arithmetic
    (`precompute_coeffs`): center = (x + 0.5) * scale, first column int(center - support + 0.5), end column
    int(center + support + 0.5), support = filter support * max(scale, 1)."""
    scale = side / new_width
    support = _FILTER_SUPPORT[resample] * max(scale, 1.0)
    first = next((x for x in range(new_width) if int((x + 0.5) * scale - support + 0.5) > image_end), new_width)
    step = new_width // math.gcd(side, new_width)
    columns = min(new_width, -(-first // step) * step)
    reach = int((columns - 0.5) * scale + support + 0.5) + 1
    return columns, columns // step * (side // math.gcd(side, new_width)), reach


@functools.lru_cache(maxsize=16)
def _padding_columns(
    side: int, new_width: int, new_height: int, columns: int, color: tuple[int, int, int], resample: int
) -> np.ndarray:
    """Output columns `columns:` of the resized padded square when their filter windows hold only padding:
    the padding row's horizontal pass, the same in every row, through the vertical pass. [new_height, n, 3]."""
    row = _padding_row(side, new_width, color, resample)[columns:]
    block = np.ascontiguousarray(np.broadcast_to(row, (side, *row.shape)))
    resized = Image.fromarray(block).resize((row.shape[0], new_height), resample=Image.Resampling(resample))
    return np.asarray(resized)  # vertical pass only: the width is unchanged


def _center_crop(hwc: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """transformers' `center_crop`: offset `(size - crop) // 2`, zero padding where the image is smaller."""
    height, width = hwc.shape[:2]
    crop_h, crop_w = crop
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return hwc[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = (new_h - height) // 2, (new_w - width) // 2
    padded = np.zeros((new_h, new_w, hwc.shape[2]), dtype=hwc.dtype)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = hwc
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _size_option(value: Any) -> int | tuple[int, int]:
    if isinstance(value, int):
        return value  # a bare int is the shortest edge (CLIPImageProcessor, default_to_square=False)
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"size {value!r} (expected an int, {{'shortest_edge'}} or {{'height', 'width'}})")


def _crop_option(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and {"height", "width"} <= value.keys():
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ValueError(f"crop_size {value!r} (expected an int or {{'height', 'width'}})")


def _triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected 3 values, got {list(value)}")
    return values  # type: ignore[return-value]
