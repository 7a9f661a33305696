"""Decoding the input image and encoding the outputs: the only places that touch image files."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000  # a 40-megapixel photo; larger is refused before it is decoded
INPUT_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}

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
            decoded = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError("image is not a readable image file; send a PNG, JPEG or WebP image.") from None
    return decoded


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
