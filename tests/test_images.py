"""Image loading and CLIP preprocessing give the reference's pixels (plus EXIF and 16-bit fixes)."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from iqa_cli.errors import UserError
from iqa_cli.images import ImageDecodeError, describe_image, load_image, to_rgb
from iqa_cli.models.mplug_owl2.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocessor, expand_to_square

MEAN = np.array(OPENAI_CLIP_MEAN)
STD = np.array(OPENAI_CLIP_STD)
PAD = (122, 116, 104)  # tuple(int(x * 255) for x in the CLIP mean)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None].astype(np.uint8)
    return Image.fromarray(noise // 4 + ramp // 2 + 32)


def _expected_pixels(image: Image.Image, size: int, crop: int, pad: bool = True) -> np.ndarray:
    """Re-derivation, written apart from the module: numpy padding, PIL bicubic resize, numpy crop, float64 math."""
    array = np.asarray(image.convert("RGB"))
    height, width = array.shape[:2]
    if pad and height != width:
        side = max(height, width)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = PAD
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top : top + height, left : left + width] = array
        array, height, width = canvas, side, side
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = resized[top : top + crop, left : left + crop].astype(np.float64)
    return ((cropped / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def _save(image: Image.Image, tmp_path, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


# ---------------------------------------------------------------------- pixel values


@pytest.mark.parametrize("size", [(640, 480), (333, 1000), (448, 448), (301, 300), (1, 1)])
def test_pixels_equal_an_independent_derivation(size):
    image = _random_image(*size)
    pixels = ClipPreprocessor()(image)
    assert pixels.dtype == torch_float32() and tuple(pixels.shape) == (3, 448, 448)
    np.testing.assert_allclose(pixels.numpy(), _expected_pixels(image, 448, 448), atol=1e-6, rtol=0)


def test_unpadded_config_resizes_and_crops_like_transformers_rounding():
    image = _random_image(333, 1000, seed=3)
    pre = ClipPreprocessor(size=256, crop_size=(224, 224), pad_to_square=False)
    assert pre.resize_shape(image.size) == (768, 256)  # int(256 * 1000 / 333) = 768
    np.testing.assert_allclose(pre.pixels(image), _expected_pixels(image, 256, 224, pad=False), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("size", "crop", "pad", "shape"),
    [
        (448, 448, True, (640, 480)),
        (448, 448, True, (300, 301)),
        (256, 224, False, (333, 1000)),
        (100, 120, False, (640, 480)),  # crop larger than the resized image: zero padding
    ],
)
def test_pixels_equal_transformers_slow_pil_processor(size, crop, pad, shape):
    transformers = pytest.importorskip("transformers")
    # transformers 5.x keeps the PIL path as CLIPImageProcessorPil; in 4.x it is CLIPImageProcessor itself.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    theirs = cls(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}, resample=3)
    ours = ClipPreprocessor(size=size, crop_size=(crop, crop), pad_to_square=pad)
    image = _random_image(*shape, seed=7)
    padded = expand_to_square(image, PAD) if pad else image
    expected = theirs(padded, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours.pixels(image), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [(448, 200, (0, 124, 448, 324)), (201, 448, (123, 0, 324, 448)), (448, 448, (0, 0, 448, 448))],
    ids=["landscape", "portrait", "square"],
)
def test_padding_colour_and_offsets(width, height, box):
    # At 448 px the resize is the identity, so the output shows the padding directly.
    image = Image.new("RGB", (width, height), (200, 10, 30))
    pixels = ClipPreprocessor().pixels(image)
    values = np.round((pixels.transpose(1, 2, 0) * STD + MEAN) * 255).astype(int)
    left, top, right, bottom = box
    mask = np.zeros((448, 448), dtype=bool)
    mask[top:bottom, left:right] = True
    assert (values[mask] == (200, 10, 30)).all()
    assert (values[~mask] == PAD).all()
    assert ClipPreprocessor().pad_color == PAD


def test_preprocessor_pickles_and_reads_configs(tmp_path):
    pre = ClipPreprocessor()
    clone = pickle.loads(pickle.dumps(pre))
    image = _random_image(50, 70)
    assert clone == pre and np.array_equal(clone.pixels(image), pre.pixels(image))
    assert pre.image_size == 448
    released = {"crop_size": 448, "size": 448, "resample": 3, "image_mean": list(OPENAI_CLIP_MEAN)}
    released |= {"image_std": list(OPENAI_CLIP_STD), "do_center_crop": True, "do_normalize": True, "do_resize": True}
    assert ClipPreprocessor.from_config(released) == pre
    nested = {**released, "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    assert ClipPreprocessor.from_config(nested).image_size == 336
    assert ClipPreprocessor.from_config({}).image_size == 224  # CLIPImageProcessor's defaults
    saved = ClipPreprocessor(size=336, crop_size=(336, 336)).save(tmp_path)
    assert ClipPreprocessor.from_config(tmp_path) == ClipPreprocessor.from_config(saved)
    assert ClipPreprocessor.from_config(saved).size == 336


def test_released_preprocessor_config_is_the_default(tokenizer_fixture):
    assert ClipPreprocessor.from_config(tokenizer_fixture / "preprocessor_config.json") == ClipPreprocessor()


def test_bad_preprocessor_configs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ClipPreprocessor.from_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"longest_edge": 5}}')
    with pytest.raises(UserError, match="longest_edge"):
        ClipPreprocessor.from_config(tmp_path)
    with pytest.raises(UserError, match="square"):
        ClipPreprocessor.from_config({"crop_size": {"height": 224, "width": 300}})


# ---------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("LA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("1", "PNG"), ("CMYK", "TIFF"), ("RGB", "JPEG")],
)
def test_modes_convert_like_the_reference(tmp_path, mode, fmt):
    base = _random_image(24, 16, seed=1)
    if mode == "P":
        image = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3  # one palette entry transparent: convert("RGB") ignores it
    elif mode in ("RGBA", "LA"):
        image = base.convert(mode)
        image.putalpha(Image.linear_gradient("L").resize(base.size))
    else:
        image = base.convert(mode)
    path = _save(image, tmp_path, f"img.{fmt.lower()}", format=fmt)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 16) and describe_image(loaded) == (24, 16)
    reference = Image.open(path).convert("RGB")  # what the reference does
    assert np.array_equal(np.asarray(loaded), np.asarray(reference))


def test_alpha_is_dropped_not_composited(tmp_path):
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(_save(image, tmp_path, "a.png")).getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    expected = [0, 1, 1, 128, 255]  # round(v * 255 / 65535)
    png = _save(Image.fromarray(values), tmp_path, "grey16.png")
    assert Image.open(png).mode == "I;16"
    assert np.asarray(load_image(png))[0, :, 0].tolist() == expected
    assert np.asarray(Image.open(png).convert("RGB"))[0, 2, 0] == 255  # Pillow alone clips 256 to 255
    tiff = _save(Image.fromarray(values.astype(">u2")), tmp_path, "grey16b.tif")
    assert Image.open(tiff).mode == "I;16B"
    assert np.asarray(load_image(tiff))[0, :, 1].tolist() == expected
    wide = Image.fromarray(np.array([[-5, 32768, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 2].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = _save(stored, tmp_path, "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40) and describe_image(loaded) == (20, 40)
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_broken_files_raise_image_decode_error(tmp_path):
    jpeg = io.BytesIO()
    _random_image(64, 64).save(jpeg, format="JPEG")
    png = io.BytesIO()
    _random_image(64, 64).save(png, format="PNG")
    cases = {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "truncated"),
        "truncated.png": (png.getvalue()[: len(png.getvalue()) // 2], "cannot decode"),
        "noise.jpg": (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an image"),
        "text.jpg": (b"this is a text file, not a JPEG\n" * 10, "not an image"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError, match=reason) as info:
            load_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name) and not isinstance(info.value, UserError)
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        load_image(tmp_path / "missing.jpg")


def test_decompression_bomb_limit(tmp_path):
    path = _save(Image.new("RGB", (100, 80)), tmp_path, "big.png")
    with pytest.raises(ImageDecodeError, match="decompression bomb: 100x80 = 8000 pixels exceeds the limit of 7999"):
        load_image(path, max_pixels=7999)
    assert load_image(path, max_pixels=8000).size == (100, 80)
    assert load_image(path, max_pixels=None).size == (100, 80)


def test_decode_error_pickles_and_takes_one_argument():
    error = pickle.loads(pickle.dumps(ImageDecodeError("truncated", "a.jpg")))
    assert (error.reason, error.path, str(error)) == ("truncated", "a.jpg", "a.jpg: truncated")
    assert str(ImageDecodeError("just a message")) == "just a message"  # how DataLoader re-raises


def test_load_from_file_object():
    buffer = io.BytesIO()
    Image.new("L", (3, 2), 7).save(buffer, format="PNG")
    buffer.seek(0)
    assert load_image(buffer).getpixel((0, 0)) == (7, 7, 7)


def torch_float32():
    import torch

    return torch.float32
