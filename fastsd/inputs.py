"""One validation path for every caller: raw inputs in, a complete GenerationRequest out.

The Cog server started without a build schema passes whatever JSON it got, so nothing here
trusts a type or a range. Every user mistake becomes one InputError sentence that names the
input and what is allowed.
"""

from __future__ import annotations

import math
import random
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import images
from .errors import InputError
from .loras import references as loras
from .tasks import Task
from .variants import CANNY, CONDITIONING_SCALE, CONTROLNETS, VAE_CHOICES, Variant

OUTPUT_FORMATS = ("webp", "jpg", "png")
MAX_OUTPUTS = 8
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARACTERS = 10_000  # far past 8 chunks of 77 tokens (fastsd.prompts): anything longer is only a cost
MAX_GUIDANCE_SCALE = 20.0
MIN_SIDE, MAX_SIDE = 64, 2048
# Past this, the memory of the decoded original is handed back: the decoded originals (up to 160 MB
# each, and their conversions) and Cog's copies of the uploads are garbage once the inputs are fitted,
# and the allocator would keep them, the worker staying at its peak (measured: 1.3 GB after a large
# image; +360 MB after a 36-megapixel RGBA mask).
LARGE_INPUT_PIXELS = 4_000_000


@dataclass(frozen=True)
class GenerationRequest:
    task: Task
    prompt: str
    negative_prompt: str
    image: Image.Image | None  # image-to-image and inpainting: already fitted to width x height
    mask: Image.Image | None  # inpainting: greyscale, white repaints, fitted like the image
    strength: float
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    num_outputs: int
    seed: int
    output_format: str
    output_quality: int
    vae: str  # "full" or "tiny"
    loras: tuple = ()  # (fastsd.loras.references.LoraFile, scale) pairs applied for this request only
    check_safety: bool = True  # false: disable_safety_checker
    controlnet: str | None = None  # canny or depth, with control_image
    control_image: Image.Image | None = None  # the map the ControlNet follows, at width x height
    conditioning_scale: float = 1.0  # how strongly it follows it

    @property
    def mode(self) -> tuple[Task, str, str | None]:
        """Which of the loaded pipelines runs it (fastsd.pipelines.Pipelines.get)."""
        return (self.task, self.vae, self.controlnet)

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only above 1; LCM and turbo are meant to run without it."""
        return self.guidance_scale > 1.0


def _whole_number(name: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a number, got {value!r}.")
    return float(value)


def _shown(value: float) -> str:
    """A number as a person wrote it: whole numbers in full (4294967295, not 4.29497e+09), and one
    too long to read (10**400, which no float holds) by its first digits."""
    if isinstance(value, int):
        digits = str(value) if abs(value) < 10**30 else f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
        return digits
    return str(int(value)) if value.is_integer() else f"{value:g}"


def steps_for_strength(steps: int, strength: float, max_steps: int) -> int:
    """Image-to-image runs int(steps x strength) of the steps asked for: how many to ask for so that
    `steps` run (at most max_steps). A strength outside (0, 1] leaves the steps as they are."""
    if not 0 < strength <= 1:
        return steps
    needed = steps / strength  # inf for a strength of 5e-324: past any max_steps
    return max_steps if needed > max_steps else math.ceil(needed - 1e-9)


def _in_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InputError(f"{name} must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}.")


def _text(name: str, value: Any, required: bool) -> str:
    if value is None:
        if required:
            raise InputError(f"{name} is required.")
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}.")
    if required and not value.strip():
        raise InputError(f"{name} must not be empty.")
    if len(value) > MAX_PROMPT_CHARACTERS:
        raise InputError(f"{name} must be at most {MAX_PROMPT_CHARACTERS} characters, got {len(value)}.")
    return value


def _loras(variant: Variant, given) -> tuple:
    """(LoraFile, scale) for each LoRA named, fetched and checked (fastsd.loras.references)."""
    chosen = []
    for name, reference, scale in given:
        if reference is None or reference == "":
            continue
        if not isinstance(reference, str):
            raise InputError(f"{name} must be text: an https URL or a Hugging Face repo id.")
        scale_name = "lora_scale" if name == "lora_weights" else f"{name}_scale"
        scale = _number(scale_name, scale)
        _in_range(scale_name, scale, 0, 2)
        lora = loras.resolve(name, reference)
        served = variant.model if variant.is_custom else variant.name
        loras.require_architecture(name, lora, variant.architecture, served)
        chosen.append((lora, scale))
    if len(chosen) == 2 and chosen[0][0].digest == chosen[1][0].digest:
        raise InputError("extra_lora is the same file as lora_weights; raise lora_scale instead.")
    return tuple(chosen)


def _is_large(path: Path | str, decoded: Image.Image) -> bool:
    """An input whose decoding leaves enough freed memory to hand back (LARGE_INPUT_PIXELS, 8 MiB)."""
    return decoded.width * decoded.height > LARGE_INPUT_PIXELS or Path(path).stat().st_size > 2**23


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}.")
    return value


def _control(variant: Variant, image: Any, controlnet: Any, scale: Any) -> tuple[Image.Image | None, str | None, float]:
    """The control image (decoded, not yet fitted), the ControlNet and its conditioning scale."""
    if controlnet is not None and controlnet not in CONTROLNETS:
        raise InputError(f"controlnet must be one of {', '.join(CONTROLNETS)}, got {controlnet!r}.")
    if image is None:
        if controlnet is not None:
            raise InputError(f"controlnet {controlnet} needs a control_image: the map the image should follow.")
        return None, None, CONDITIONING_SCALE[variant.architecture]
    if controlnet is None:
        raise InputError(f"control_image needs controlnet: one of {', '.join(CONTROLNETS)}, the kind of map it is.")
    if scale is None:
        scale = CONDITIONING_SCALE[variant.architecture]
    scale = _number("controlnet_conditioning_scale", scale)
    _in_range("controlnet_conditioning_scale", scale, 0, 2)
    return images.flatten(images.open_input_image(image, "control_image")), controlnet, scale


def _side(name: str, value: Any) -> int:
    side = _whole_number(name, value)
    if side % 8 or not MIN_SIDE <= side <= MAX_SIDE:
        raise InputError(f"{name} must be a multiple of 8 between {MIN_SIDE} and {MAX_SIDE}, got {side}.")
    return side


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _multiple_of_8(side: float, rounding=_round_half_up) -> int:
    return min(MAX_SIDE, max(MIN_SIDE, int(rounding(side / 8)) * 8))


def _fit_to_budget(width: float, height: float, max_pixels: int) -> tuple[int, int]:
    """The input image's size rounded to multiples of 8, scaled down only if over the pixel budget."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    nearest = _multiple_of_8(width * scale), _multiple_of_8(height * scale)
    if nearest[0] * nearest[1] <= max_pixels:
        return nearest
    return _multiple_of_8(width * scale, math.floor), _multiple_of_8(height * scale, math.floor)


def _size(variant: Variant, width: Any, height: Any, source: Image.Image | None) -> tuple[int, int]:
    width = None if width is None else _side("width", width)
    height = None if height is None else _side("height", height)
    if source is None:
        width, height = width or variant.width, height or variant.height
    elif width is None and height is None:
        width, height = _fit_to_budget(*source.size, variant.max_pixels)
    elif width is None or height is None:  # keep the input's aspect ratio for the side left out
        aspect = source.width / source.height
        width = width or _multiple_of_8(height * aspect)
        height = height or _multiple_of_8(width / aspect)
    if width * height > variant.max_pixels:
        raise InputError(
            f"width x height must be at most {variant.max_pixels} pixels for {variant.name}, "
            f"got {width}x{height} = {width * height}."
        )
    return width, height


def validate(variant: Variant, **inputs: Any) -> GenerationRequest:
    """Check every input against the variant's limits and fill in its defaults (_validate). After a
    large image input the allocator's freed memory is handed back, once the decoded originals are
    garbage: when this returns, or fails (the failed call's locals cleared first)."""
    large: list[str] = []  # the image inputs _validate decoded that were large
    try:
        return _validate(variant, large, **inputs)
    except InputError as error:
        if large:
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if large:
            images.release_unused_memory()


def _validate(
    variant: Variant,
    large: list[str],
    *,
    prompt: Any = None,
    negative_prompt: Any = "",
    image: Path | str | None = None,
    mask: Path | str | None = None,
    strength: Any = 0.8,
    num_inference_steps: Any = None,
    guidance_scale: Any = None,
    width: Any = None,
    height: Any = None,
    num_outputs: Any = 1,
    seed: Any = None,
    output_format: Any = "webp",
    output_quality: Any = 80,
    vae: Any = None,
    control_image: Path | str | None = None,
    controlnet: Any = None,
    controlnet_conditioning_scale: Any = None,
    control_preprocess: Any = True,
    lora_weights: Any = None,
    lora_scale: Any = 1.0,
    extra_lora: Any = None,
    extra_lora_scale: Any = 1.0,
    disable_safety_checker: Any = False,
) -> GenerationRequest:
    """validate(), noting in large each image input past LARGE_INPUT_PIXELS or 8 MiB."""
    prompt = _text("prompt", prompt, required=True)
    negative_prompt = _text("negative_prompt", negative_prompt, required=False)
    chosen = _loras(variant, (("lora_weights", lora_weights, lora_scale), ("extra_lora", extra_lora, extra_lora_scale)))
    for lora, _ in chosen:  # a Replicate training's placeholder ("TOK") stands for its new tokens
        for placeholder, tokens in lora.placeholders.items():
            prompt, negative_prompt = prompt.replace(placeholder, tokens), negative_prompt.replace(placeholder, tokens)

    num_outputs = _whole_number("num_outputs", num_outputs)
    _in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS)
    if output_format not in OUTPUT_FORMATS:
        raise InputError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}.")
    vae = variant.default_vae if vae is None else vae
    if vae not in VAE_CHOICES:
        raise InputError(f"vae must be one of {', '.join(VAE_CHOICES)}, got {vae!r}.")
    output_quality = _whole_number("output_quality", output_quality)
    _in_range("output_quality", output_quality, 1, 100)
    seed = random.randint(0, MAX_SEED) if seed is None else _whole_number("seed", seed)
    _in_range("seed", seed, 0, MAX_SEED)

    guidance_scale = variant.guidance_scale if guidance_scale is None else _number("guidance_scale", guidance_scale)
    _in_range("guidance_scale", guidance_scale, 0, MAX_GUIDANCE_SCALE)
    strength = _number("strength", strength)
    _in_range("strength", strength, 0, 1)

    source = images.open_input_image(image) if image is not None else None
    large.extend(["image"] if source is not None and _is_large(image, source) else [])
    area = None  # what to repaint: the mask, or the transparent pixels of the image (outpainting)
    if mask is not None:
        if source is None:
            raise InputError("mask needs an image: it marks the part of image to repaint (white) and to keep (black).")
        decoded_mask = images.open_input_image(mask, "mask")
        large.extend(["mask"] if _is_large(mask, decoded_mask) else [])
        area = images.as_mask(decoded_mask, source.size)
    elif source is not None:
        area = images.transparent_area(source)
    if source is not None:
        source = images.flatten(source)
    control, controlnet, scale = _control(variant, control_image, controlnet, controlnet_conditioning_scale)
    large.extend(["control_image"] if control is not None and _is_large(control_image, control) else [])
    if control is not None and area is not None:
        raise InputError("control_image does not combine with mask or a transparent image (inpainting); send one.")
    width, height = _size(variant, width, height, source if source is not None else control)
    if num_outputs * width * height > variant.max_batch_pixels:
        raise InputError(
            f"num_outputs x width x height must be at most {variant.max_batch_pixels} pixels for {variant.name}, "
            f"got {num_outputs} x {width}x{height}; ask for fewer or smaller images."
        )

    if num_inference_steps is None:
        steps = variant.num_inference_steps
        if source is not None and not variant.recipe.scheduler.timesteps:
            # Image-to-image runs int(steps * strength) steps: keep the variant's step count. (A
            # recipe with fixed timesteps keeps them: strength picks the last of those it runs.)
            steps = steps_for_strength(steps, strength, variant.max_steps)
    else:
        steps = _whole_number("num_inference_steps", num_inference_steps)
        _in_range("num_inference_steps", steps, 1, variant.max_steps)
    task = Task.TEXT_TO_IMAGE if source is None else Task.IMAGE_TO_IMAGE if area is None else Task.INPAINTING
    if source is not None and int(steps * strength) < 1:
        raise InputError(
            f"strength x num_inference_steps must be at least 1 for {task}, got {strength:g} x {steps} "
            f"= {strength * steps:g}; raise strength to at least {1 / steps:.2g} or use more steps."
        )

    fitted = None if source is None else images.fit(source, width, height)
    fitted_area = None if area is None else images.fit(area, width, height)
    if mask is not None and fitted_area.getextrema()[1] == 0:
        raise InputError("mask is all black: nothing to repaint; paint white where the image should change.")
    if control is not None:
        control = images.fit(control, width, height)
        if controlnet == CANNY and _boolean("control_preprocess", control_preprocess):
            control = images.canny_edges(control)
    return GenerationRequest(
        task=task,
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=fitted,
        mask=fitted_area,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        width=width,
        height=height,
        num_outputs=num_outputs,
        seed=seed,
        output_format=output_format,
        output_quality=output_quality,
        vae=vae,
        loras=chosen,
        check_safety=not _boolean("disable_safety_checker", disable_safety_checker),
        controlnet=controlnet,
        control_image=control,
        conditioning_scale=scale,
    )
