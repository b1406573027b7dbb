"""Image decoding, the same for every model family (each family's preprocessing lives in its folder).

The reference loads with `Image.open(path).convert("RGB")` (DeQA-Score `src/evaluate/iqa_eval.py`,
`src/datasets/*.py`). Two deliberate departures from the reference's loading: EXIF orientation is applied
(the reference scores camera JPEGs sideways), and 16-bit images are scaled to 8 bits (Pillow's `convert("RGB")`
clips them, turning almost every 16-bit image white). Truncated files are errors here; the reference's training sets
`ImageFile.LOAD_TRUNCATED_IMAGES = True` (`src/datasets/utils.py`) and scores them grey-filled.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from iqa_cli.constants import DEFAULT_MAX_PIXELS
from iqa_cli.errors import DecodeError

# Extensions (lower case) of the images a folder walk picks up and a WebDataset sample's image member may have,
# in order of preference when a sample has two. Files given by name or listed with `--from` are read whatever
# their extension; formats Pillow cannot decode here (HEIC without a plugin) become rows with `error` set.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jpe", ".jfif", ".dib", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif", ".heic", ".heif",
)  # fmt: skip
# Pillow warns on the screen when an image is over its limit (and refuses it above twice that). `load_image` checks
# the same size itself and makes an over-limit image a row with `error` set, so the warning would only repeat that
# row's reason, raw, once per decoding process. A process-wide filter: `warnings.catch_warnings` is not
# thread-safe, and `iqa serve` decodes in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageDecodeError(DecodeError):
    """An image that cannot be decoded (not an image, truncated, over the pixel limit)."""


def load_image(
    source: str | Path | IO[bytes],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None,
) -> Image.Image:
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
        draft: JPEG only, opt-in (`iqa score --fast-decode`): (width, height) as stored -> the smallest size
            to decode at, or None; the JPEG decoder then scales by 1/2, 1/4 or 1/8 in the DCT domain while
            staying at least that large (Pillow's `Image.draft`): other pixels than a full decode gives.
            `image.info["decoded_from"]` keeps the upright full size.

    Raises:
        ImageDecodeError: a missing, empty, truncated, non-image or oversized file.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", None)
    if _is_empty(source):  # the same error for an empty file and an empty shard member or Parquet cell
        raise ImageDecodeError("empty file (0 bytes)", name)
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
        full_size = image.size
        if draft is not None and image.format == "JPEG" and (request := draft(full_size)) is not None:
            image.draft(image.mode, request)
        try:
            image.load()  # full decode now, so truncation is caught here and not in the model's batch
        except Exception as err:
            raise ImageDecodeError(f"cannot decode ({image.format}): {type(err).__name__}: {err}", name) from None
        drafted = image.size
        with contextlib.suppress(Exception):  # a broken EXIF block is no reason to lose the pixels
            ImageOps.exif_transpose(image, in_place=True)
        try:
            # Leaving `with` closes only the file; the decoded pixels stay usable.
            rgb = to_rgb(image)
            if drafted != full_size:
                rgb.info["decoded_from"] = full_size if image.size == drafted else full_size[::-1]
            return rgb
        except (ValueError, OSError) as err:
            raise ImageDecodeError(f"cannot convert mode {image.mode} to RGB: {err}", name) from None


def _is_empty(source: str | Path | IO[bytes]) -> bool:
    if isinstance(source, (str, Path)):
        try:
            return Path(source).stat().st_size == 0
        except OSError as err:
            raise ImageDecodeError(f"cannot read file: {err.strerror or err}", str(source)) from None
    if isinstance(source, io.BytesIO):
        return source.getbuffer().nbytes == 0
    return False


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
    """(width, height) for the output rows: the image as stored, upright, before padding and resizing (a JPEG
    decoded at a smaller DCT scale reports its full size)."""
    return image.info.get("decoded_from", image.size)
