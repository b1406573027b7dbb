"""Synthetic IQA data: what `iqa demo` and the tests train on (the tiny models: each family's `tiny.py`).

The images are natural-looking (1/f "cloud" textures with hard-edged shapes) and distorted by blur, JPEG and
noise at graded strengths; the MOS is a known monotone function of the strength and the std comes from a
seeded model, so a model that learns quality must rank them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

DISTORTIONS = ("blur", "jpeg", "noise")  # applied in this order
STRENGTHS = 8  # graded strengths 0, 1/7, ..., 1


# --- images -----------------------------------------------------------------------------------------------------


def _cloud(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A 1/f^2 random field (natural images' power spectrum), zero mean, unit std."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(h, w))
    return (field - field.mean()) / (field.std() + 1e-8)


def natural_image(rng: np.random.Generator, width: int, height: int):
    """A cloud texture in a random two-colour palette with a few hard-edged rectangles and ellipses."""
    from PIL import Image, ImageDraw

    t = 1.0 / (1.0 + np.exp(-1.5 * _cloud(rng, height, width)))[..., None]
    a, b = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    image = Image.fromarray((a * t + b * (1 - t)).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        box = [x0, y0, x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    return image


def distort(image, kind: str, strength: float, rng: np.random.Generator):
    """Gaussian blur (radius up to 3 px), JPEG (quality 90 -> 5) or grey Gaussian noise (sigma up to 50)."""
    from PIL import Image, ImageFilter

    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=3.0 * strength)) if strength > 0 else image
    if kind == "noise":
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 50 * strength, (image.height, image.width, 1))
        return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=round(90 - 85 * strength))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


MOS_RANGE = (5.0, 105.0)  # the strongest distortion's MOS, a pristine image's


def mos_of_strength(strength: np.ndarray) -> np.ndarray:
    """The known monotone quality function: 105 for pristine down to 5 for the strongest distortion."""
    lo, hi = MOS_RANGE
    return (hi - lo) * (1.0 - strength) ** 1.3 + lo


def make_synthetic_iqa(
    root: Path,
    n: int,
    *,
    seed: int = 0,
    pipeline: tuple[str, ...] = DISTORTIONS,
    size: tuple[int, int] = (112, 96),
) -> Path:
    """Writes `root/images/*.png` and `root/scores.csv` (image, mos, std); returns the CSV path.

    Every image goes through each step of `pipeline` (blur, then JPEG, then noise, like a camera's
    degradations) at one strength drawn from STRENGTHS graded values; the MOS is `mos_of_strength`.
    """
    rng = np.random.default_rng(seed)
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        strength = float(rng.integers(0, STRENGTHS)) / (STRENGTHS - 1)
        image = natural_image(rng, *size)
        for kind in pipeline:
            image = distort(image, kind, strength, rng)
        name = f"img{i:04d}.png"
        image.save(images / name)
        # raters disagree most in the middle of the scale (a seeded model of the std)
        std = 4.0 + 10.0 * np.sqrt(strength * (1 - strength)) + abs(rng.normal(0.0, 1.0))
        rows.append((name, f"{float(mos_of_strength(np.array(strength))):.4f}", f"{std:.4f}"))
    path = Path(root) / "scores.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mos", "std"])
        writer.writerows(rows)
    return path
