"""The checks of single values that fastsd.inputs is made of: each refusal one InputError sentence
naming the input and what it allows. Nothing here trusts a type: the Cog server run without its
schema passes whatever JSON it got."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from .errors import InputError
from .variants import Variant

MAX_PROMPT_CHARACTERS = 10_000  # far past 8 chunks of 77 tokens (fastsd.prompts): anything longer is only a cost
MIN_SIDE, MAX_SIDE = 64, 2048


def whole_number(name: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise InputError(f"{name} must be a whole number, got {value!r}.", field=name)
    return int(value)


def number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}.", field=name)
    return float(value)


def shown(value: float) -> str:
    """A number as a person wrote it: whole numbers in full (4294967295, not 4.29497e+09), and one
    too long to read (10**400, which no float holds) by its first digits."""
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
    return str(int(value)) if value.is_integer() else f"{value:g}"


def in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InputError(f"{name} must be between {shown(low)} and {shown(high)}, got {shown(value)}.", field=name)


def text(name: str, value: Any, required: bool) -> str:
    if value is None:
        if required:
            raise InputError(f"{name} is required.", field=name)
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}.", field=name)
    if required and not value.strip():
        raise InputError(f"{name} must not be empty.", field=name)
    if len(value) > MAX_PROMPT_CHARACTERS:
        raise InputError(f"{name} must be at most {MAX_PROMPT_CHARACTERS} characters, got {len(value)}.", field=name)
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}.", field=name)
    return value


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}.", field=name)
    return value


def side(name: str, value: Any, multiple: int = 8, model: str = "") -> int:
    whole = whole_number(name, value)
    if whole % multiple or not MIN_SIDE <= whole <= MAX_SIDE:
        where = f" for {model}" if multiple != 8 and model else ""
        raise InputError(
            f"{name} must be a multiple of {multiple} between {MIN_SIDE} and {MAX_SIDE}{where}, got {whole}.",
            field=name,
        )
    return whole


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _multiple(length: float, multiple: int, rounding=_round_half_up) -> int:
    return min(MAX_SIDE, max(MIN_SIDE, int(rounding(length / multiple)) * multiple))


def _fit_to_budget(width: float, height: float, max_pixels: int, multiple: int) -> tuple[int, int]:
    """The input image's size rounded to the model's multiple, scaled down only if over the pixel budget."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    nearest = _multiple(width * scale, multiple), _multiple(height * scale, multiple)
    if nearest[0] * nearest[1] <= max_pixels:
        return nearest
    return _multiple(width * scale, multiple, math.floor), _multiple(height * scale, multiple, math.floor)


def size(variant: Variant, width: Any, height: Any, source: Image.Image | None) -> tuple[int, int]:
    """The output size: as asked, else the source image's (rounded, within the budget), else the
    variant's; a side left out keeps the source's aspect ratio."""
    multiple = variant.size_multiple
    width = None if width is None else side("width", width, multiple, variant.name)
    height = None if height is None else side("height", height, multiple, variant.name)
    if source is None:
        width, height = width or variant.width, height or variant.height
    elif width is None and height is None:
        width, height = _fit_to_budget(*source.size, variant.max_pixels, multiple)
    elif width is None or height is None:  # keep the input's aspect ratio for the side left out
        aspect = source.width / source.height
        width = width or _multiple(height * aspect, multiple)
        height = height or _multiple(width / aspect, multiple)
    if width * height > variant.max_pixels:
        raise InputError(
            f"width x height must be at most {variant.max_pixels} pixels for {variant.name}, "
            f"got {width}x{height} = {width * height}.",
            field="width",
        )
    return width, height


def steps_for_strength(steps: int, strength: float, max_steps: int) -> int:
    """Image-to-image runs int(steps x strength) of the steps asked for: how many to ask for so that
    `steps` run (at most max_steps). A strength outside (0, 1] leaves the steps as they are."""
    if not 0 < strength <= 1:
        return steps
    needed = steps / strength  # inf for a strength of 5e-324: past any max_steps
    return max_steps if needed > max_steps else math.ceil(needed - 1e-9)
