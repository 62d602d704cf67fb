"""melanoma.images: every input is made in memory here, good and bad, and each must decode or fail with its reason."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from melanoma.config import Settings
from melanoma.images import ImageError, decode, resize

MAX_PIXELS = Settings().max_image_pixels
MAX_SIDE = Settings().max_decoded_side
RED = (255, 0, 0)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    image = decode(data, MAX_PIXELS, MAX_SIDE)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


def error(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageError) as raised:
        decode(data, max_pixels, MAX_SIDE)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 300
    return message


def noise(width: int, height: int) -> Image.Image:
    """Noise compresses badly, so half of the file really is half of the pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def declare_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR width and height rewritten (and the chunk CRC fixed), pixel data untouched."""
    chunk = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def declare_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 height and width rewritten, found by walking the marker segments."""
    pos = 2
    while jpeg[pos + 1] != 0xC0:
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    return jpeg[: pos + 5] + struct.pack(">HH", height, width) + jpeg[pos + 9 :]


# ---------------------------------------------------------------- inputs that are not images


def test_empty_file():
    assert error(b"") == "empty file (0 bytes)"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>", "not an image (looks like HTML)"),
        (b"\n  <HTML><body>Service Unavailable</body></HTML>", "not an image (looks like HTML)"),
        (b"patient_id,lesion,score\n123,left arm,0.42\n", "not an image (looks like text)"),
        ("Läsion, Größe: 4 mm\n".encode() * 100, "not an image (looks like text)"),
        (bytes(range(256)) * 8, "not an image: unrecognized format (only JPEG and PNG are decoded)"),
        (encode(Image.new("RGB", (8, 8)), "GIF"), "not an image: unrecognized format (only JPEG and PNG are decoded)"),
    ],
)
def test_not_an_image_says_what_it_looks_like_without_quoting_it(data, message):
    assert error(data) == message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_file_cut_in_half_is_truncated(fmt):
    data = encode(noise(300, 200), fmt)
    message = error(data[: len(data) // 2])
    assert message.startswith("truncated or corrupt image: image file is truncated")


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0" + bytes(16), b"\x89PNG\r\n\x1a\n" + bytes(30)])
def test_broken_header_is_corrupt(data):
    assert error(data).startswith("truncated or corrupt image: ")


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("fmt, declare", [("PNG", declare_png_size), ("JPEG", declare_jpeg_size)])
def test_decompression_bomb_is_refused_from_the_header(fmt, declare, monkeypatch):
    def no_pixels(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    bomb = declare(encode(Image.new("RGB", (16, 16)), fmt), 30000, 30000)
    start = time.perf_counter()
    message = error(bomb)
    assert time.perf_counter() - start < 0.5
    assert message == "decompression bomb: declared 30000x30000 (900000000 pixels) exceeds limit 64000000"


def test_pixel_limit_is_ours_and_pillow_globals_are_untouched():
    pillow_limit, load_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    data = encode(Image.new("RGB", (100, 80)), "PNG")
    assert error(data, max_pixels=7999) == "decompression bomb: declared 100x80 (8000 pixels) exceeds limit 7999"
    assert decode(data, 8000, MAX_SIDE).shape == (80, 100, 3)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (pillow_limit, load_truncated)


# ---------------------------------------------------------------- huge but valid


@pytest.fixture(scope="module")
def huge_jpeg() -> bytes:
    """8000x6000 (48 Mpixel, under the limit) with four coloured quadrants."""
    image = Image.new("RGB", (8000, 6000), "white")
    image.paste(RED, (0, 0, 4000, 3000))
    image.paste((0, 0, 255), (4000, 3000, 8000, 6000))
    return encode(image, "JPEG", quality=90)


def test_huge_jpeg_is_downscaled_keeping_aspect_and_content(huge_jpeg):
    image = decoded(huge_jpeg)
    assert image.shape == (768, 1024, 3)
    assert np.abs(image[100, 100].astype(int) - RED).max() < 10
    assert np.abs(image[600, 900].astype(int) - (0, 0, 255)).max() < 10
    assert image[100, 900].min() > 245


PEAK_RSS_GROWTH = r"""
import re, sys
from melanoma.images import decode

def peak_kib():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))

data = sys.stdin.buffer.read()
before = peak_kib()
image = decode(data, int(sys.argv[1]), int(sys.argv[2]))
print(image.shape[1], peak_kib() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux /proc")
def test_huge_jpeg_is_never_decoded_at_full_size(huge_jpeg):
    """Peak RSS (VmHWM) of a fresh process: Pillow's pixel buffers are invisible to tracemalloc, and ru_maxrss
    starts at the parent's size. A full-size decode alone would add 8000*6000*4 bytes (RGBX) = 192 MB;
    decoding at 1/4 scale adds about 20 MB."""
    child = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_GROWTH, str(MAX_PIXELS), str(MAX_SIDE)],
        input=huge_jpeg,
        capture_output=True,
        check=True,
        timeout=120,
    )
    width, growth_kib = map(int, child.stdout.split())
    assert width == 1024
    assert growth_kib < 48 * 1024


def test_large_png_is_downscaled_keeping_aspect():
    image = decoded(encode(Image.new("RGB", (3000, 1000), RED), "PNG"))
    assert image.shape == (341, 1024, 3)
    assert (image == RED).all()


# ---------------------------------------------------------------- modes, orientation, round trips


def test_jpeg_round_trip():
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    image = decoded(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert image.shape == (48, 64, 3)
    assert np.abs(image.astype(int) - pixels).mean() < 2


def test_png_round_trip_is_exact():
    pixels = np.asarray(noise(50, 30))
    assert np.array_equal(decoded(encode(Image.fromarray(pixels), "PNG")), pixels)


def test_decoded_array_is_writable():
    assert decoded(encode(Image.new("RGB", (8, 8)), "PNG")).flags.writeable


def half_transparent(mode: str) -> Image.Image:
    """Left half fully transparent black, right half opaque black, then a 50%-transparent black column."""
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 20))
    rgba.paste((0, 0, 0, 128), (30, 0, 40, 20))
    if mode == "P":
        palette = Image.new("P", (40, 20))
        palette.putpalette([0, 0, 0, 0, 0, 0])
        palette.paste(1, (0, 0, 20, 20))
        palette.info["transparency"] = 1
        return palette
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    image = decoded(encode(half_transparent(mode), "PNG"))
    assert (image[:, :20] == 255).all()
    assert (image[:, 20:30] == 0).all()
    if mode != "P":
        assert np.abs(image[:, 30:].astype(int) - 127).max() <= 1


def test_grayscale_becomes_three_equal_channels():
    grey = np.tile(np.arange(256, dtype=np.uint8), (10, 1))
    image = decoded(encode(Image.fromarray(grey), "PNG"))
    assert all(np.array_equal(image[..., channel], grey) for channel in range(3))


def test_one_bit_becomes_black_and_white():
    bits = Image.new("1", (16, 8), 0)
    bits.paste(1, (8, 0, 16, 8))
    image = decoded(encode(bits, "PNG"))
    assert (image[:, :8] == 0).all() and (image[:, 8:] == 255).all()


def test_sixteen_bit_gradient_is_scaled_not_clipped():
    """Pillow 13's own I;16 -> L/RGB conversion clips everything above 255 to white."""
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    data = encode(Image.fromarray(gradient), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decoded(data)
    assert np.abs(image[..., 0].astype(int) - gradient / 257).max() <= 1
    assert (image[..., 0] == image[..., 2]).all()
    assert np.all(np.diff(image[0, :, 0].astype(int)) >= 0) and image.min() == 0 and image.max() == 255


@pytest.mark.parametrize(
    "cmyk, rgb",
    [
        ((0, 255, 255, 0), RED),
        ((255, 0, 0, 0), (0, 255, 255)),
        ((0, 0, 0, 0), (255, 255, 255)),
        ((0, 0, 0, 255), (0, 0, 0)),
    ],
)
def test_cmyk_jpeg_keeps_its_colour(cmyk, rgb):
    data = encode(Image.new("CMYK", (32, 24), cmyk), "JPEG")
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None  # Pillow writes Adobe (inverted) CMYK
    image = decoded(data)
    assert image.shape == (24, 32, 3)
    assert np.abs(image.astype(int) - rgb).max() < 20


@pytest.mark.parametrize("orientation, marked_corner", [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1)), (1, (0, 0))])
def test_exif_orientation_is_applied(orientation, marked_corner):
    """A 60x30 sensor image, red top-left corner, displayed rotated: 6 = 90 degrees clockwise, 8 = counter-clockwise."""
    stored = Image.new("RGB", (60, 30), "white")
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decoded(encode(stored, "JPEG", exif=exif, quality=95))
    assert image.shape == ((60, 30, 3) if orientation in (6, 8) else (30, 60, 3))
    for row, col in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        corner = image[row * 3, col * 3].astype(int)  # 3 pixels in from the edge, away from JPEG ringing
        is_red = np.abs(corner - RED).max() < 30
        assert is_red == ((row, col) == marked_corner)


# ---------------------------------------------------------------- resize


def test_resize_squashes_to_a_square():
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = RED
    out = resize(image, 180)
    assert out.shape == (180, 180, 3) and out.dtype == np.uint8
    assert (out[:, :80] == 0).all() and (out[:, 100:] == RED).all()


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3))])
def test_resize_refuses_anything_but_rgb_uint8(bad):
    with pytest.raises(ValueError, match="expected an HxWx3 uint8 image"):
        resize(bad, 180)
