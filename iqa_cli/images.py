"""Image decoding and CLIP preprocessing with the reference's pixel values.

The reference loads with `Image.open(path).convert("RGB")` (DeQA-Score `src/evaluate/iqa_eval.py`,
`src/datasets/*.py`), pads to a square filled with the CLIP mean colour (`expand2square`, `src/mm_utils.py`)
and runs transformers' slow, PIL-based `CLIPImageProcessor` (bicubic shortest-edge resize, center crop,
x/255, (x - mean)/std). `ClipPreprocessor` reproduces those numbers without transformers; torchvision-based
fast processors resize differently and are not used.

Two deliberate departures from the reference's loading: EXIF orientation is applied (the reference scores
camera JPEGs sideways), and 16-bit images are scaled to 8 bits (Pillow's `convert("RGB")` clips them, turning
almost every 16-bit image white). Truncated files are errors here; the reference's training sets
`ImageFile.LOAD_TRUNCATED_IMAGES = True` (`src/datasets/utils.py`) and scores them grey-filled.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

from iqa_cli.errors import UserError

# Pillow's default decompression-bomb limit (89,478,485 pixels, about 0.25 GB as 24-bit RGB).
DEFAULT_MAX_PIXELS = 89_478_485
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageDecodeError(Exception):
    """An image that cannot be decoded; scoring turns it into a row with `error` set and goes on."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(reason, path)
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


def load_image(source: str | Path | IO[bytes], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes an image fully and returns it as RGB, upright.

    RGB conversion is Pillow's `convert("RGB")` as in the reference (palette, L, LA, 1-bit, CMYK; alpha is
    dropped, not composited), except for 16-bit grey images (modes I;16, I;16B, I;16L, I;16N and I, as
    16-bit PNG, TIFF and PGM decode): they are scaled with `v8 = round(v16 * 255 / 65535) = (v16 + 128) // 257`
    (mode I clipped to [0, 65535] first) instead of clipped at 255. EXIF orientation is applied
    (`ImageOps.exif_transpose`); an unreadable EXIF block leaves the image as stored.

    Args:
        source: a path or a binary file object.
        max_pixels: width x height above which the file is refused as a decompression bomb, checked from the
            header before decoding; None for no limit of ours. Pillow refuses above twice
            `PIL.Image.MAX_IMAGE_PIXELS` on its own, whatever this says.

    Raises:
        ImageDecodeError: a missing, empty, truncated, non-image or oversized file.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", None)
    if isinstance(source, (str, Path)):
        try:
            if Path(source).stat().st_size == 0:
                raise ImageDecodeError("empty file (0 bytes)", name)
        except OSError as err:
            raise ImageDecodeError(f"cannot read file: {err.strerror or err}", name) from None
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {err}", name) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image Pillow can read", name) from None
    except Exception as err:  # decoders of untrusted files raise many types (OSError, SyntaxError, ...)
        raise ImageDecodeError(f"cannot open: {type(err).__name__}: {err}", name) from None
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
                name,
            )
        try:
            image.load()  # full decode now, so truncation is caught here and not in the model's batch
        except Exception as err:
            raise ImageDecodeError(f"cannot decode ({image.format}): {type(err).__name__}: {err}", name) from None
        with contextlib.suppress(Exception):  # a broken EXIF block is no reason to lose the pixels
            ImageOps.exif_transpose(image, in_place=True)
        try:
            # Leaving `with` closes only the file; the decoded pixels stay usable.
            return to_rgb(image)
        except (ValueError, OSError) as err:
            raise ImageDecodeError(f"cannot convert mode {image.mode} to RGB: {err}", name) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`convert("RGB")`, except that 16-bit grey is scaled to 8 bits (see `load_image`)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)  # I;16B arrives big-endian; astype gives native ints
        values = (np.clip(values, 0, 65535) + 128) // 257
        return Image.fromarray(values.astype(np.uint8)).convert("RGB")  # 2-D uint8 -> mode L
    if image.mode == "RGB":
        return image.copy() if image.readonly else image
    return image.convert("RGB")


def describe_image(image: Image.Image) -> tuple[int, int]:
    """(width, height) for the output rows: the image as loaded (upright), before padding and resizing."""
    return image.size


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
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path} is not valid JSON: {err}") from None
            if not isinstance(config, dict):
                raise UserError(f"{path} must hold a JSON object")
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
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.pad_to_square:
            image = expand_to_square(image, self.pad_color)
        if self.do_resize:
            height, width = self.resize_shape(image.size)
            # Pillow returns a copy when the size is unchanged, as transformers' call does.
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        hwc = np.asarray(image)  # H, W, 3 uint8
        if self.do_center_crop:
            hwc = _center_crop(hwc, self.crop_size)
        lut = self._value_table()
        out = np.empty((3, *hwc.shape[:2]), dtype=np.float32)
        for c in range(3):
            np.take(lut[c], hwc[..., c], out=out[c])
        return out

    def resize_shape(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) after the resize, rounded as transformers' `get_resize_output_image_size`:
        the short side becomes `size`, the long side `int(size * long / short)`."""
        if not isinstance(self.size, int):
            return self.size
        width, height = image_size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def _value_table(self) -> np.ndarray:
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
