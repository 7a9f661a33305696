"""Decoding the input image and encoding the outputs: the only places that touch image files."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_INPUT_PIXELS = 40_000_000  # a 40-megapixel photo; larger is refused before it is decoded
INPUT_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
# Pillow refuses to open an image of more than twice this many pixels (a decompression bomb: a
# 389 KB PNG of 20000x20000) before decoding anything; fastsd's own limit, checked right after
# the header is read, is this one.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS
_BOMB_SIZE = re.compile(r"\((\d+) pixels\)")

# Output encoder settings, chosen for speed with the quality kept (the measurements:
# docs/performance.md): WebP's fastest method at the same quality setting and PSNR; PNG is lossless
# at any zlib level, and level 1 costs only slightly larger files; JPEG is fast as it is.
_SAVE_OPTIONS = {
    "png": lambda quality: {"format": "PNG", "compress_level": 1},
    "jpg": lambda quality: {"format": "JPEG", "quality": quality},
    "webp": lambda quality: {"format": "WEBP", "quality": quality, "method": 0},
}


def input_size(source: Path | str | bytes) -> int:
    """The bytes of an image input: a file (what Cog downloaded) or the bytes themselves (a frame)."""
    return len(source) if isinstance(source, bytes) else Path(source).stat().st_size


def open_input_image(source: Path | str | bytes, name: str = "image") -> Image.Image:
    """Open, check and decode a user's image (the input called name: a file, or its bytes) to 8-bit
    RGB, or RGBA where it has transparency (flatten() and transparent_area() read that), honouring
    EXIF orientation."""
    try:
        size = input_size(source)
    except OSError:
        raise InputError(
            f"{name} could not be read; send a PNG, JPEG, WebP, GIF, BMP or TIFF file or URL.", field=name
        ) from None
    if size > MAX_INPUT_BYTES:
        # Cog decoded the data URI or download before run(): hand that memory back, then refuse.
        release_unused_memory()
        raise InputError(
            f"{name} must be at most {MAX_INPUT_BYTES // 2**20} MiB, got {size / 2**20:.1f} MiB.", field=name
        )
    readable = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        with Image.open(readable) as opened:
            if opened.format not in INPUT_FORMATS:
                raise InputError(
                    f"{name} must be one of {', '.join(sorted(INPUT_FORMATS))}, got {opened.format}.", field=name
                )
            if opened.width * opened.height > MAX_INPUT_PIXELS:
                raise InputError(
                    f"{name} must have at most {MAX_INPUT_PIXELS} pixels, got {opened.width}x{opened.height}.",
                    field=name,
                )
            opened.seek(0)  # the first frame of an animation
            decoded = to_8_bits(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        found = _BOMB_SIZE.search(str(error))
        claimed = f", got {found[1]}" if found else ""
        raise InputError(f"{name} must have at most {MAX_INPUT_PIXELS} pixels{claimed}.", field=name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(
            f"{name} is not a readable image file; send a PNG, JPEG, WebP, GIF, BMP or TIFF image.", field=name
        ) from None
    return decoded


def _greyscale_to_8_bits(values: np.ndarray) -> np.ndarray:
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


def to_8_bits(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens, as 8-bit RGB, or RGBA when it has transparency (LA, P with a
    transparent colour): high-bit-depth greyscale scaled down, CMYK and 1-bit converted."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = Image.fromarray(_greyscale_to_8_bits(np.asarray(image)), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return image.convert("RGBA")
    return image.convert("RGB")


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over white."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    return flatten(to_8_bits(image))


def transparent_area(image: Image.Image) -> Image.Image | None:
    """Where an image is transparent, as a mask (white: fully transparent), or None when it has
    no transparent pixel: the area an outpainting request fills."""
    if image.mode != "RGBA":
        return None
    alpha = image.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    return ImageOps.invert(alpha)


def as_mask(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask input as greyscale (white: repaint, black: keep, grey: blend) at the image's size."""
    grey = flatten(image).convert("L")
    return grey if grey.size == size else grey.resize(size, Image.Resampling.LANCZOS)


SOFT_EDGE = 2  # pixels: the Gaussian blur's radius around the mask's white area


def soft_edge(mask: Image.Image, edge: float = SOFT_EDGE) -> Image.Image:
    """The mask, widened by a soft edge a few pixels wide around its white area (never narrowed)."""
    return ImageChops.lighter(mask, mask.filter(ImageFilter.GaussianBlur(edge)))


def keep_unmasked(
    original: Image.Image, generated: Image.Image, mask: Image.Image, edge: float = SOFT_EDGE
) -> Image.Image:
    """The generated pixels where the mask is white, the original ones where it is black, blended
    over a soft edge a few pixels wide around the white area: a few-step model then leaves the rest
    of a photo exactly as it was, instead of passing all of it through the VAE. (fastsd.gpu's
    postprocess.keep_unmasked does the same on device tensors.)"""
    return Image.composite(generated, original, soft_edge(mask, edge))


def release_unused_memory() -> None:
    """Give freed heap memory back to the system: after a large input image the allocator keeps
    hundreds of MB otherwise (glibc's malloc_trim; a no-op where there is none)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
        if trim is not None:
            trim(0)


# Canny thresholds: what the ControlNet cards pass to cv2.Canny (low 100, high 200).
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_edges(image: Image.Image) -> Image.Image:
    """A photo or drawing as the white-on-black edge map the canny ControlNets were trained on."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(edges).convert("RGB")


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale and centre-crop to exactly width x height, keeping the aspect ratio (no stretching)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def fit_within(image: Image.Image, max_pixels: int, multiple: int) -> Image.Image:
    """Scaled down (never up) to at most max_pixels, each side cut to a multiple (fit's centre crop)."""
    scale = min(1.0, math.sqrt(max_pixels / (image.width * image.height)))
    width = max(multiple, int(image.width * scale) // multiple * multiple)
    height = max(multiple, int(image.height * scale) // multiple * multiple)
    return fit(image, width, height)


def digest(pictures: Sequence[Image.Image]) -> str:
    """A hash of the pictures' pixels: equal for the same images, whatever object holds them."""
    hashed = hashlib.sha256()
    for picture in pictures:
        hashed.update(f"{picture.mode}{picture.size}".encode())
        hashed.update(picture.tobytes())
    return hashed.hexdigest()


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **_SAVE_OPTIONS[output_format](quality))
    return buffer.getvalue()


def save(image: Image.Image, path: Path, output_format: str, quality: int) -> Path:
    path.write_bytes(encode(image, output_format, quality))
    return path
