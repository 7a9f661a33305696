"""Decoding the input image and encoding the outputs: the only places that touch image files."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000  # a 40-megapixel photo; larger is refused before it is decoded
INPUT_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
# Pillow refuses to open an image of more than twice this many pixels (a decompression bomb: a
# 389 KB PNG of 20000x20000) before decoding anything; fastsd's own limit, checked right after
# the header is read, is this one.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")

# Output encoder settings, chosen for speed with the quality kept (measured on the 2-core CPU,
# scripts/benchmark.py prints the table): WebP method 0 encodes 5x faster than Pillow's default
# method 4 at the same quality setting, with the same PSNR and file size within 2%; PNG is lossless
# at any zlib level, and level 1 is 2.4x faster than the default 6 for ~3% larger files; JPEG is
# already an order of magnitude faster than either.
_SAVE_OPTIONS = {
    "png": lambda quality: {"format": "PNG", "compress_level": 1},
    "jpg": lambda quality: {"format": "JPEG", "quality": quality},
    "webp": lambda quality: {"format": "WEBP", "quality": quality, "method": 0},
}


def open_input_image(path: Path | str) -> Image.Image:
    """Open, check and decode a user's image to RGB, honouring its EXIF orientation."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError("image could not be read; send a PNG, JPEG or WebP file or URL.") from None
    if size > MAX_INPUT_BYTES:
        # Cog decoded the data URI or download before run(): hand that memory back, then refuse.
        release_unused_memory()
        raise InputError(f"image must be at most {MAX_INPUT_BYTES // 2**20} MiB, got {size / 2**20:.1f} MiB.")
    try:
        with Image.open(path) as opened:
            if opened.format not in INPUT_FORMATS:
                raise InputError(f"image must be one of {', '.join(sorted(INPUT_FORMATS))}, got {opened.format}.")
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise InputError(
                    f"image must have at most {MAX_INPUT_PIXELS} pixels, got {opened.width}x{opened.height}."
                )
            opened.seek(0)  # the first frame of an animation
            decoded = to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        found = _BOMB_SIZE.search(str(error))
        size = f", got {found[1]}" if found else ""
        raise InputError(f"image must have at most {MAX_INPUT_PIXELS} pixels{size}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError("image is not a readable image file; send a PNG, JPEG or WebP image.") from None
    return decoded


def _to_8_bits(values: np.ndarray) -> np.ndarray:
    """Greyscale of more than 8 bits (16-bit PNGs open as I;16 or I; TIFFs as F) scaled to 0-255,
    never clipped: a 16-bit value of 30000 is mid-grey, not white."""
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if top <= 1.0 and values.dtype.kind == "f":
        scale = 255.0  # floats in 0..1
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255 / 65535
    else:
        scale = 255 / top
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens, as 8-bit RGB: high-bit-depth greyscale scaled down, transparency
    (RGBA, LA, P with a transparent colour) laid over white, CMYK and 1-bit converted."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_to_8_bits(np.asarray(image)), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def release_unused_memory() -> None:
    """Give freed heap memory back to the system: after a large input image the allocator keeps
    hundreds of MB otherwise (glibc's malloc_trim; a no-op where there is none)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
        if trim is not None:
            trim(0)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to exactly width x height, keeping the aspect ratio (no stretching)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **_SAVE_OPTIONS[output_format](quality))
    return buffer.getvalue()


def save(image: Image.Image, path: Path, output_format: str, quality: int) -> Path:
    path.write_bytes(encode(image, output_format, quality))
    return path
