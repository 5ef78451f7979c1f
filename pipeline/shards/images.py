"""Robust image decoding and fixed-size transforms, shared by the writer, the stream and `inspect`.

`decode_image(data, transform, draw)` turns the bytes of one image member into a uint8 array
of shape (size, size, channels), whatever the file holds: grey, grey+alpha, RGB, RGBA,
palette (with or without transparency), bilevel, CMYK or 16-bit images. Anything that cannot
become such an array raises `DecodeError` with a short reason, so callers skip and count it.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import warnings
from typing import Literal

import numpy as np
import pydantic
from PIL import Image

from tokenmill.pipeline.config import StrictModel
from tokenmill.pipeline.shards.problems import (
    CORRUPT_IMAGE,
    DECOMPRESSION_BOMB,
    EMPTY_IMAGE,
    NOT_AN_IMAGE,
    TOO_MANY_PIXELS,
    reason,
)

# Fast decoders for the common cases (Linux wheels); PIL handles everything else.
try:
    import pyspng  # libspng
except ImportError:  # pragma: no cover - platforms without a wheel
    pyspng = None
try:
    import simplejpeg  # libjpeg-turbo, the library PIL uses, without PIL's per-image overhead
except ImportError:  # pragma: no cover
    simplejpeg = None

# Member extensions the decoder accepts, in the order a sample's image member is chosen.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"

# Transparent pixels are composited onto this grey level (white) before alpha is dropped.
BACKGROUND = 255


class DecodeError(ValueError):
    """One sample that cannot be decoded; the message is the short reason that gets reported."""


class TransformConfig(StrictModel):
    """How every decoded image becomes one fixed-size training array (size, size, channels)."""

    size: int = pydantic.Field(32, ge=1, le=4096)
    channels: Literal[1, 3] = 3
    # resize: squash to size x size; center-crop: shorter side to size, central window;
    # random-crop: shorter side to a random length in [size, size * crop_jitter], random window.
    # random-resized-crop (Inception style): a random window of [crop_scale, 1] of the area and
    # aspect ratio in [3/4, 4/3], resized to size x size.
    resize: Literal["resize", "center-crop", "random-crop", "random-resized-crop"] = "center-crop"
    crop_jitter: float = pydantic.Field(1.15, ge=1.0, le=2.0)
    crop_scale: float = pydantic.Field(0.35, gt=0.0, le=1.0)
    hflip: bool = False
    # Decompression-bomb guard: images with more pixels than this are rejected unread.
    max_pixels: int = pydantic.Field(40_000_000, ge=1)

    def for_eval(self) -> "TransformConfig":
        """The same geometry without randomness (validation, tokenization): random-crop becomes
        center-crop and there is no flip."""
        resize = "center-crop" if self.resize.startswith("random") else self.resize
        return self.model_copy(update={"resize": resize, "hflip": False})


class Draw:
    """Per-sample random choices (flip, crop) seeded by a hash of (seed, epoch, key):
    deterministic whatever task, worker or order a sample is decoded in."""

    def __init__(self, seed: int, epoch: int, key: str):
        digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
        self.rng = random.Random(int.from_bytes(digest, "little"))

    def take(self, n: int) -> int:
        """A number in [0, n)."""
        return self.rng.randrange(n)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """A lazily decoded PIL image, after the pixel-count guard (only the header is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise DecodeError(reason(DECOMPRESSION_BOMB, "too many pixels")) from None
    except Exception as err:  # PIL raises many types for bad headers
        raise DecodeError(reason(NOT_AN_IMAGE, type(err).__name__)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(reason(TOO_MANY_PIXELS, f"{width}x{height} > max_pixels={max_pixels}"))
    if width == 0 or height == 0:
        raise DecodeError(EMPTY_IMAGE)
    return image


def to_8bit(image: Image.Image) -> Image.Image:
    """An image in mode L (grey) or RGB with alpha composited onto BACKGROUND; 16-bit and
    32-bit grey scaled to 8 bits, palette expanded."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode.startswith("I;16") or mode == "I":  # 16-bit grey (0..65535) -> 0..255
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    if mode == "F":  # float grey, [0, 1] if it fits there, else 0..255
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels * 255.0 if pixels.max(initial=0.0) <= 1.0 else pixels
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        return image.convert("L")
    if image.mode in ("LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        composite = Image.alpha_composite(background, rgba).convert("RGB")
        return composite.convert("L") if image.mode in ("LA", "La") else composite
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def load_pixels(data: bytes, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode `data` fully into an L or RGB image. `draft_size` lets JPEG decode at a reduced
    scale that still keeps both sides >= draft_size (much faster for large photos)."""
    image = open_image(data, max_pixels)
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB" if image.mode != "L" else "L", (draft_size, draft_size))
        image.load()
        return to_8bit(image)
    except DecodeError:
        raise
    except Exception as err:  # truncated or corrupt pixel data
        raise DecodeError(reason(CORRUPT_IMAGE, f"{type(err).__name__}: {err}")[:200]) from None


def resize_crop(image: Image.Image, transform: TransformConfig, draw: Draw | None) -> Image.Image:
    """An image of exactly size x size (resize mode squashes; crop modes keep the aspect)."""
    size, (width, height) = transform.size, image.size
    if transform.resize == "random-resized-crop" and draw is not None:
        return random_resized_crop(image, transform, draw)
    if transform.resize == "resize":
        return image if (width, height) == (size, size) else image.resize((size, size), Image.BILINEAR)
    short = size
    if transform.resize == "random-crop" and draw is not None:
        short = size + draw.take(int(size * (transform.crop_jitter - 1.0)) + 1)
    scale = short / min(width, height)
    new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if transform.resize == "random-crop" and draw is not None:
        left, top = draw.take(new_w - size + 1), draw.take(new_h - size + 1)
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    if (left, top, new_w, new_h) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def random_resized_crop(image: Image.Image, transform: TransformConfig, draw: Draw) -> Image.Image:
    """A window of a random share of the area in [crop_scale, 1] and aspect ratio in [3/4, 4/3]
    (log-uniform), resized to size x size; after 10 misses the largest central square."""
    width, height = image.size
    for _ in range(10):
        area = width * height * (transform.crop_scale + (1.0 - transform.crop_scale) * draw.take(1001) / 1000)
        aspect = math.exp(math.log(3 / 4) + math.log(16 / 9) * draw.take(1001) / 1000)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = draw.take(width - w + 1), draw.take(height - h + 1)
            return image.resize((transform.size, transform.size), Image.BILINEAR, box=(left, top, left + w, top + h))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize((transform.size, transform.size), Image.BILINEAR, box=(left, top, left + side, top + side))


def decode_image(data: bytes, transform: TransformConfig, draw: Draw | None = None) -> np.ndarray:
    """Bytes of one image member -> uint8 (size, size, channels). Raises DecodeError.
    `draw` supplies the random choices of random-crop / hflip (None: center, no flip)."""
    pixels = fast_pixels(data, transform)  # (H, W[, C]) with the configured channels, or None
    crop_anyway = transform.resize == "random-resized-crop" and draw is not None  # even at the target size
    if pixels is None or pixels.shape[:2] != (transform.size, transform.size) or crop_anyway:
        image = Image.fromarray(pixels) if pixels is not None else pil_image(data, transform)
        # now: (size, size), the configured channels
        pixels = np.asarray(resize_crop(image, transform, draw), dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if transform.hflip and draw is not None and draw.take(2):
        pixels = pixels[:, ::-1]
    return pixels


def pil_image(data: bytes, transform: TransformConfig) -> Image.Image:
    """Any image PIL can read, as mode L or RGB (the configured channels), 8 bits, any size."""
    image = load_pixels(data, transform.max_pixels, draft_size=transform.size)
    mode = "L" if transform.channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


def fast_pixels(data: bytes, transform: TransformConfig) -> np.ndarray | None:
    """uint8 (H, W) or (H, W, C) for the common images, 2-4x faster than PIL on small ones and
    pixel-identical to the PIL path; None for everything else (palette, alpha, 16-bit, CMYK,
    channel conversions, JPEGs PIL would decode at reduced scale, corrupt data), which then
    takes the PIL path and gets its error reasons."""
    if data.startswith(PNG_SIGNATURE):
        return fast_png(data, transform.channels, transform.max_pixels)
    if data.startswith(JPEG_SIGNATURE):
        return fast_jpeg(data, transform)
    return None


def fast_png(data: bytes, channels: int, max_pixels: int) -> np.ndarray | None:
    """libspng for 8-bit grey or RGB PNGs that already have `channels` (PNG is lossless)."""
    if pyspng is None or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]
    if bit_depth != 8 or colour_type != (0 if channels == 1 else 2) or not 0 < width * height <= max_pixels:
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # noqa: BLE001 - corrupt data: PIL decodes it again and names the reason
        return None
    expected = (height, width) if channels == 1 else (height, width, 3)
    return pixels if pixels.shape == expected and pixels.dtype == np.uint8 else None


def fast_jpeg(data: bytes, transform: TransformConfig) -> np.ndarray | None:
    """libjpeg-turbo via simplejpeg (same IDCT and upsampling as PIL) for grey or colour JPEGs
    that already have the configured channels and that PIL would decode at full scale: PIL's
    `draft` uses 1/2-1/8 only, simplejpeg also 7/8..., so reduced-scale decodes stay on PIL."""
    if simplejpeg is None:
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # noqa: BLE001 - unreadable header: PIL names the reason
        return None
    size = transform.size
    if not 0 < width * height <= transform.max_pixels or (width // size >= 2 and height // size >= 2):
        return None
    if colourspace not in (("Gray",) if transform.channels == 1 else ("YCbCr", "RGB")):
        return None
    try:  # strict: recoverable errors (truncated data) raise, as PIL does
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if transform.channels == 1 else "RGB", strict=True)
    except Exception:  # noqa: BLE001
        return None
    return pixels[:, :, 0] if transform.channels == 1 else pixels


def native_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 (H, W, C) at the original size, C = 1 for grey sources and 3 otherwise
    (what the shard writer stores and what `inspect --verify` checks)."""
    pixels = np.asarray(load_pixels(data, max_pixels), dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
