"""The split resizes give the plain padded resize, bit for bit: landscape (the padding rows' horizontal pass
skipped) and portrait (the right-hand padding columns taken from a cache)."""

import numpy as np
import pytest
from PIL import Image

from iqa_cli.images import load_image
from iqa_cli.models.mplug_owl2.preprocess import ClipPreprocessor, _portrait_columns, expand_to_square


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over a ramp: every output pixel mixes distinct values, and both ends of the range are hit."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width)[None, :, None].astype(np.uint8)
    return Image.fromarray(np.where(rng.random((height, width, 1)) < 0.1, noise, noise // 2 + ramp // 2))


def _plain(pre: ClipPreprocessor, image: Image.Image) -> np.ndarray:
    """The reference's order: the whole padded square through one `Image.resize`, then the center crop."""
    square = expand_to_square(image.convert("RGB"), pre.pad_color)
    height, width = pre.resize_shape(square.size)
    resized = np.asarray(square.resize((width, height), resample=Image.Resampling(pre.resample)))
    crop_h, crop_w = pre.crop_size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return resized[top : top + crop_h, left : left + crop_w]


SIZES = [(1024, 768), (768, 1024), (1001, 667), (667, 1001), (449, 448), (448, 447), (447, 448), (300, 299), (1, 1),
         (2, 1), (1, 2), (2000, 100), (100, 2000), (4480, 224), (224, 4480), (21, 1), (1, 21), (5, 3), (3, 5),
         (447, 1), (1, 447), (600, 800), (1080, 1920), (997, 1999), (3024, 4032)]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_split_resize_equals_the_plain_padded_resize(size):
    pre = ClipPreprocessor()
    image = _photo(*size, seed=sum(size))
    ours = pre.uint8_pixels(image)
    assert ours.dtype == np.uint8 and ours.shape == (448, 448, 3)
    np.testing.assert_array_equal(ours, _plain(pre, image))


@pytest.mark.parametrize("resample", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("side", [224, 37])
def test_every_separable_filter_and_small_outputs(resample, side):
    pre = ClipPreprocessor(size=side, crop_size=(side, side), resample=resample)
    for size in [(640, 479), (479, 640), (3, 2), (2, 3), (999, 50), (50, 999), (333, 1001)]:
        image = _photo(*size, seed=resample)
        np.testing.assert_array_equal(pre.uint8_pixels(image), _plain(pre, image), err_msg=str(size))


def test_a_resize_to_a_rectangle_then_a_crop():
    pre = ClipPreprocessor(size=(300, 320), crop_size=(224, 224))  # an explicit (height, width) resize
    for size in [(640, 479), (479, 640), (21, 1), (1, 21)]:
        image = _photo(*size, seed=3)
        np.testing.assert_array_equal(pre.uint8_pixels(image), _plain(pre, image), err_msg=str(size))


@pytest.mark.parametrize("size", [(768, 1024), (667, 1001), (3024, 4032), (1080, 1920), (100, 2000), (1, 21)])
def test_portrait_photos_take_the_split_path(size):
    """The portrait split is used (not only correct when used): fewer columns than the output's, and its result
    alone equals the plain resize."""
    pre = ClipPreprocessor()
    width, height = size
    columns, box_right, _ = _portrait_columns(height, 448, (height - width) // 2 + width, pre.resample)
    assert columns < 448 and box_right * 448 == columns * height  # a whole-pixel box edge
    image = _photo(*size, seed=width)
    square = pre._resize_portrait_padded(image)
    assert square is not None and square.shape == (448, 448, 3)
    np.testing.assert_array_equal(square, _plain(pre, image))


def test_nearest_and_unpadded_take_the_plain_path():
    for pre in (ClipPreprocessor(resample=0), ClipPreprocessor(size=256, crop_size=(224, 224), pad_to_square=False)):
        image = _photo(641, 480)
        if pre.pad_to_square:
            expected = _plain(pre, image)
        else:
            height, width = pre.resize_shape(image.size)
            resized = np.asarray(image.resize((width, height), resample=Image.Resampling(pre.resample)))
            top, left = (height - 224) // 2, (width - 224) // 2
            expected = resized[top : top + 224, left : left + 224]
        np.testing.assert_array_equal(pre.uint8_pixels(image), expected)


def _mode_image(mode: str) -> Image.Image:
    photo = _photo(333, 200, seed=7)
    if mode == "I;16":
        grey = np.asarray(photo.convert("L")).astype(np.uint16) * 257 + 100
        return Image.fromarray(grey)  # uint16 -> I;16
    if mode == "LA":
        return Image.merge("LA", (photo.convert("L"), photo.getchannel(0)))
    if mode == "RGBA":
        return Image.merge("RGBA", (*photo.split(), photo.getchannel(1)))
    return photo.convert(mode)


@pytest.mark.parametrize(("mode", "suffix"), [("L", "png"), ("LA", "png"), ("P", "png"), ("RGBA", "png"),
                                              ("I;16", "png"), ("CMYK", "tiff"), ("RGB", "jpg")])  # fmt: skip
def test_every_mode_the_loader_passes(tmp_path, mode, suffix):
    """Through the public path (a file, `load_image`, the preprocessor), portrait and landscape."""
    pre = ClipPreprocessor()
    for name, image in (("wide", _mode_image(mode)), ("tall", _mode_image(mode).transpose(Image.Transpose.ROTATE_90))):
        path = tmp_path / f"{name}.{suffix}"
        image.save(path)
        loaded = load_image(path)
        np.testing.assert_array_equal(pre.uint8_pixels(loaded), _plain(pre, loaded), err_msg=name)
        assert np.array_equal(
            pre.pixels(loaded), pre.value_table()[np.arange(3)[:, None, None], _plain(pre, loaded).transpose(2, 0, 1)]
        )
