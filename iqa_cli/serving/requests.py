"""Request bodies -> image and video bytes -> decoded images and videos, with one-line reasons for every refusal.

Two protocols carry the same thing:
- `POST /score`: JSON `{"images": ["<base64 PNG/JPEG/WebP or MP4/WebM/MKV/MOV/AVI>", ...], "probs": true}`; a
  `data:image/...;base64,` (or `data:video/...`) prefix is accepted.
- `POST /`: the reward-server protocol of Flow-GRPO, a pickled `{"images": [<JPEG bytes>, ...]}`, read by
  `safe_pickle.loads_data` (plain data only; nothing a payload names is ever called).

An entry is a video when its bytes start like a video container (`iqa_cli.video.looks_like_video`: no file name
to go by), and is decoded by `iqa score`'s own decoder, with the server's sampling.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

from iqa_cli.images import ImageDecodeError, load_image
from iqa_cli.serving.safe_pickle import UnsafePickleError, loads_data
from iqa_cli.video import looks_like_video


class BadRequest(Exception):
    """A request refused as a whole: HTTP `status` and a one-line `reason` for the client."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(reason.split())


@dataclass
class ScoreRequest:
    # encoded files in request order; an entry that carries no file (not base64, not bytes) is the reason why, and
    # becomes that image's error entry as an undecodable file does (the other images are scored)
    images: list[bytes | ImageDecodeError]
    probs: bool = False  # whether the answer carries the level probabilities


def parse_json(body: bytes, max_images: int) -> ScoreRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(400, f"body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, 'body must be a JSON object {"images": [base64, ...]}')
    images = _image_list(data, max_images)
    probs = data.get("probs", False)
    if not isinstance(probs, bool):
        raise BadRequest(400, f'"probs" must be true or false, got {probs!r}')
    decoded: list[bytes | ImageDecodeError] = []
    for item in images:
        if not isinstance(item, str):
            decoded.append(ImageDecodeError(f"expected a base64 string, got {type(item).__name__}"))
        else:
            decoded.append(_b64decode(item))
    return ScoreRequest(decoded, probs)


def parse_pickle(body: bytes, max_images: int) -> ScoreRequest:
    try:
        data = loads_data(body)
    except UnsafePickleError as err:
        raise BadRequest(400, f"refused pickle: {err}") from None
    except ValueError as err:
        raise BadRequest(400, f"body is {err}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "pickle must hold a dict {'images': [bytes, ...]}")
    images = _image_list(data, max_images)
    return ScoreRequest(
        [
            item
            if isinstance(item, bytes)
            else ImageDecodeError(f"expected encoded image bytes, got {type(item).__name__}")
            for item in images
        ]
    )


def decode_image(data: bytes | ImageDecodeError, max_pixels: int) -> Any:
    """Encoded bytes -> RGB PIL image, or ImageDecodeError (no file in the entry, a non-image, a truncated file, a
    bomb)."""
    if isinstance(data, ImageDecodeError):
        raise data
    if not data:
        raise ImageDecodeError("empty image (0 bytes)")
    return load_image(io.BytesIO(data), max_pixels=max_pixels)


def is_video(data: bytes | ImageDecodeError) -> bool:
    """Whether an entry's bytes are a video (by their container signature)."""
    return isinstance(data, bytes) and looks_like_video(data)


def decode_video(data: bytes, decoder: Any) -> Any:
    """A video entry -> its row as `iqa score` decodes it (`iqa_cli.scoring.loader.Decoder`: PyAV, seeking to the
    sampled frames, the family's video transform): a `Decoded` with the video inputs and their frame count,
    duration and frame rate, or its `error` (a broken or audio-only file, a family that scores no videos), the
    text of `iqa score`'s error row."""
    from iqa_cli.sources import Sample

    return decoder(Sample("video", data=data, video=True))


def _image_list(data: dict, max_images: int) -> list:
    images = data.get("images")
    if not isinstance(images, list | tuple):
        raise BadRequest(400, '"images" must be a list of images')
    if len(images) > max_images:
        raise BadRequest(413, f"{len(images)} images in one request; the limit is {max_images} (--max-images)")
    return list(images)


def _b64decode(text: str) -> bytes | ImageDecodeError:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            return ImageDecodeError("a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        return ImageDecodeError(f"malformed base64 ({err})")
