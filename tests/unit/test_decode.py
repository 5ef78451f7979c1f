"""Robust decoding: every image mode becomes the configured channels at a fixed size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tokenmill.pipeline.shards.images import DecodeError, Draw, TransformConfig, decode_image, native_pixels


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def grey_ramp(h=6, w=10) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 4).astype(np.uint8)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (4, 1)), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756)
    if transparent:
        image.info["transparency"] = 0
    return image


MODES = {
    "L": lambda: Image.fromarray(grey_ramp(), "L"),
    "LA": lambda: Image.fromarray(np.dstack([grey_ramp(), np.full((6, 10), 255, np.uint8)]), "LA"),
    "RGB": lambda: Image.fromarray(np.dstack([grey_ramp()] * 3), "RGB"),
    "RGBA": lambda: Image.fromarray(np.dstack([grey_ramp()] * 3 + [np.full((6, 10), 128, np.uint8)]), "RGBA"),
    "P": lambda: palette_image(False),
    "P+transparency": lambda: palette_image(True),
    "1": lambda: Image.fromarray(grey_ramp() > 100).convert("1"),
    "I;16": lambda: Image.fromarray(grey_ramp().astype(np.uint16) * 257),
    "CMYK": lambda: Image.fromarray(np.dstack([grey_ramp()] * 3), "RGB").convert("CMYK"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_becomes_the_configured_channels(mode, channels):
    image = MODES[mode]()
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = decode_image(encode(image, fmt), TransformConfig(size=8, channels=channels, resize="resize"))
    assert pixels.shape == (8, 8, channels) and pixels.dtype == np.uint8


def test_16_bit_grey_is_scaled_not_clipped():
    ramp = grey_ramp()
    image = Image.fromarray(ramp.astype(np.uint16) * 257)
    assert np.array_equal(native_pixels(encode(image, "PNG"), 10**6)[:, :, 0], ramp)


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    pixels = native_pixels(encode(Image.fromarray(rgba, "RGBA")), 10**6)
    assert pixels.shape == (4, 4, 3) and (pixels == 255).all()


def test_palette_keeps_colours():
    pixels = native_pixels(encode(palette_image(False)), 10**6)
    assert pixels[0, :3].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_pixel_limit_guards_against_bombs():
    data = encode(Image.new("L", (200, 200)))
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(data, TransformConfig(size=8, max_pixels=1000))


@pytest.mark.parametrize("data", [b"", b"not an image at all", None])
def test_garbage_and_truncated_data_raise_decode_error(data):
    if data is None:  # a JPEG cut in half
        noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        full = encode(Image.fromarray(noisy), "JPEG")
        data = full[: len(full) // 2]
    with pytest.raises(DecodeError):
        decode_image(data, TransformConfig(size=8))


def test_center_crop_keeps_aspect_and_resize_squashes():
    wide = np.zeros((10, 30), np.uint8)
    wide[:, 10:20] = 255  # white centre third
    data = encode(Image.fromarray(wide, "L"))
    crop = decode_image(data, TransformConfig(size=10, channels=1, resize="center-crop"))
    assert (crop == 255).all()
    squashed = decode_image(data, TransformConfig(size=10, channels=1, resize="resize"))
    assert squashed[:, 0].max() < 128 and squashed[:, 5].min() > 128


def test_random_transforms_are_deterministic_per_key_and_epoch():
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)))
    config = TransformConfig(size=16, resize="random-crop", crop_jitter=1.5, hflip=True)
    same = [decode_image(data, config, Draw(0, 0, "k")) for _ in range(2)]
    assert np.array_equal(*same)
    variants = {decode_image(data, config, Draw(0, epoch, "k")).tobytes() for epoch in range(8)}
    assert len(variants) > 1
    assert all(decode_image(data, config, Draw(0, e, "k")).shape == (16, 16, 3) for e in range(8))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("save", [{}, {"optimize": True}, {"interlace": 1}, {"gamma": 0.45}, {"transparency": 0}])
@pytest.mark.parametrize("shape", [(32, 32), (40, 27)])
def test_fast_png_path_matches_pil_pixel_for_pixel(monkeypatch, channels, save, shape):
    import tokenmill.pipeline.shards.images as decode

    if decode.pyspng is None:
        pytest.skip("pyspng has no wheel for this platform")
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, shape + ((3,) if channels == 3 else ()), dtype=np.uint8)
    if "transparency" in save and channels == 3:
        save = {"transparency": (0, 0, 0)}
    data = io.BytesIO()
    Image.fromarray(source).save(data, format="PNG", **save)
    data = data.getvalue()
    for transform in (TransformConfig(size=32, channels=channels), TransformConfig(size=24, channels=1, resize="resize")):
        fast = decode_image(data, transform)
        monkeypatch.setattr(decode, "pyspng", None)
        slow = decode_image(data, transform)
        monkeypatch.undo()
        assert fast.shape == slow.shape == (transform.size, transform.size, transform.channels)
        np.testing.assert_array_equal(fast, slow)
    assert decode.fast_png(data, channels, max_pixels=10**6) is not None  # the fast path was taken
    assert decode.fast_png(data, channels, max_pixels=shape[0] * shape[1] - 1) is None  # the guard holds


def test_corrupt_png_gets_the_same_reason_on_the_fast_path():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise, "RGB"))
    data = data[: len(data) // 2]  # cut inside the pixel data
    with pytest.raises(DecodeError, match="corrupt image data"):
        decode_image(data, TransformConfig(size=32))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("save", [{"subsampling": 0}, {"subsampling": 2}, {"progressive": True}])
@pytest.mark.parametrize("shape", [(32, 32), (37, 51), (70, 90)])  # 70x90 at size 32: PIL drafts at 1/2
def test_fast_jpeg_path_matches_pil_pixel_for_pixel(monkeypatch, channels, save, shape):
    import tokenmill.pipeline.shards.images as decode

    if decode.simplejpeg is None:
        pytest.skip("simplejpeg has no wheel for this platform")
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (shape[0] // 8 + 1, shape[1] // 8 + 1, 3), dtype=np.uint8)
    source = np.repeat(np.repeat(coarse, 8, 0), 8, 1)[: shape[0], : shape[1]]
    image = Image.fromarray(source).convert("L" if channels == 1 else "RGB")
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=90, **save)
    data = data.getvalue()
    transform = TransformConfig(size=32, channels=channels)
    fast = decode_image(data, transform)
    monkeypatch.setattr(decode, "simplejpeg", None)
    slow = decode_image(data, transform)
    monkeypatch.undo()
    np.testing.assert_array_equal(fast, slow)
    taken = decode.fast_pixels(data, transform) is not None
    assert taken == (shape != (70, 90))  # reduced-scale decodes stay on PIL


def test_corrupt_or_cmyk_jpeg_takes_the_pil_path():
    import tokenmill.pipeline.shards.images as decode

    cmyk = encode(Image.new("CMYK", (32, 32), (10, 20, 30, 40)), "JPEG")
    assert decode.fast_pixels(cmyk, TransformConfig(size=32)) is None
    assert decode_image(cmyk, TransformConfig(size=32)).shape == (32, 32, 3)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise, "RGB"), "JPEG")
    with pytest.raises(DecodeError, match="corrupt image data"):
        decode_image(data[: len(data) // 2], TransformConfig(size=32))
