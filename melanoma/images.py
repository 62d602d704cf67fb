"""Bytes -> RGB image array: the one place that decodes images, for training and scoring alike.

Every way an input can be bad ends as an ImageError whose one-line message says why, fit for the `error` column.
Only JPEG and PNG are decoded (config.IMAGE_SUFFIXES). Pillow's plugin classes are used directly instead of
Image.open, so no other decoder ever sees archive bytes and our max_pixels is the one limit in force: Image.open
would first apply Pillow's process-wide MAX_IMAGE_PIXELS, whose error does not carry the declared width and height.
Truncated files are caught because Pillow's ImageFile.LOAD_TRUNCATED_IMAGES is False by default; nothing here sets it.
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin

from melanoma.errors import MelanomaError

_FORMATS = {
    b"\xff\xd8\xff": JpegImagePlugin.JpegImageFile,
    b"\x89PNG\r\n\x1a\n": PngImagePlugin.PngImageFile,
}
# What Pillow raises for a file that starts like a JPEG or PNG but is cut short or damaged.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, IndexError, struct.error, EOFError)


class ImageError(MelanomaError):
    """Why one input could not be decoded, in one line."""


def decode(data: bytes, max_pixels: int, max_side: int) -> np.ndarray:
    """HxWx3 uint8 RGB, upright, with the long side at most max_side; ImageError for anything that is not."""
    image = _open_header(data, max_pixels)
    try:
        image.draft("RGB", _fit(image.size, max_side))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never full size
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        image = _to_rgb(image)
    except _PILLOW_ERRORS as exc:
        raise _corrupt(exc) from exc
    size = _fit(image.size, max_side)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.array(image)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """size x size x 3 uint8, bilinear; the aspect ratio is not kept, the whole image is squashed into the square."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read; refused if empty, not a JPEG or PNG, or declaring too many pixels."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    opener = next((opener for magic, opener in _FORMATS.items() if data.startswith(magic)), None)
    if opener is None:
        raise ImageError(_not_an_image(data))
    try:
        image = opener(io.BytesIO(data))
    except _PILLOW_ERRORS as exc:
        raise _corrupt(exc) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"decompression bomb: declared {width}x{height} ({width * height} pixels) exceeds limit {max_pixels}"
        )
    return image


def _not_an_image(data: bytes) -> str:
    """Name what the bytes look like instead (a saved HTML error page is the usual culprit), never quoting them."""
    head = data[:1024]
    if b"<html" in head.lower() or b"<!doctype" in head.lower():
        return "not an image (looks like HTML)"
    text = head.decode("utf-8", errors="replace")
    if sum(c != "\ufffd" and (c.isprintable() or c.isspace()) for c in text) >= 0.95 * len(text):
        return "not an image (looks like text)"
    return "not an image: unrecognized format (only JPEG and PNG are decoded)"


def _corrupt(exc: Exception) -> ImageError:
    """Pillow's reason on one line, with any bytes it quotes from the file (a PNG chunk type) left out."""
    reason = re.sub(r"""b(['"]).*?\1""", "<bytes>", " ".join(str(exc).split()))[:200] or type(exc).__name__
    return ImageError(f"truncated or corrupt image: {reason}")


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most max_side, aspect ratio kept."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent areas on white and 16-bit grey scaled to 8 bits (Pillow's convert clips it at 255)."""
    if image.mode == "I;16":
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", image.size, "white")
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image if image.mode == "RGB" else image.convert("RGB")
