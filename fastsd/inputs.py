"""One validation path for every caller: raw inputs in, a complete GenerationRequest out.

The inputs are a table (INPUTS: names, defaults, bounds and choices as predict.py declares them;
tests/test_inputs.py checks the two agree). validate() checks a request against it, the variant's
limits and what the deployment serves (Served), in the order that costs least: what needs no file
first, then the LoRAs (fetched), then the images (decoded). Every user mistake becomes one
InputError sentence that names the input (InputError.field) and what is allowed.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from . import images
from .errors import InputError
from .input_checks import (
    MAX_PROMPT_CHARACTERS,
    boolean,
    choice,
    in_range,
    number,
    size,
    steps_for_strength,
    text,
    whole_number,
)
from .loras import references as loras
from .loras.references import LoraFile, Rules
from .tasks import PipelineKey, Task
from .variants import (
    ARCHITECTURE_NAMES,
    CANNY,
    CONDITIONING_SCALE,
    CONTROLNET_IMAGE_TO_IMAGE,
    CONTROLNETS,
    CONTROLNETS_ENV,
    DISTILLED,
    FULL_VAE,
    VAE_CHOICES,
    Variant,
)

__all__ = ["INPUTS", "MAX_PROMPT_CHARACTERS", "GenerationRequest", "Served", "steps_for_strength", "validate"]


@dataclass(frozen=True)
class Input:
    """An input as the API names it, with the default, bounds and choices predict.py declares."""

    name: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    many: bool = False  # a list of values (predict.py: list[...])


OUTPUT_FORMATS = ("webp", "jpg", "png")
IMAGE_INPUTS = ("image", "mask", "control_image", "reference_images")
INPUTS: dict[str, Input] = {
    row.name: row
    for row in (
        Input("prompt"),
        Input("negative_prompt", ""),
        Input("image"),
        Input("mask"),
        Input("reference_images", many=True),
        Input("strength", 0.8, 0.0, 1.0),
        Input("num_inference_steps", None, 1, 100),  # and the variant's max_steps
        Input("guidance_scale", None, 0.0, 20.0),
        Input("width", None, 64, 2048),  # a multiple of 8, within the variant's pixel budget
        Input("height", None, 64, 2048),
        Input("num_outputs", 1, 1, 8),
        Input("seed", None, 0, 4294967295),
        Input("output_format", "webp", choices=OUTPUT_FORMATS),
        Input("vae", None, choices=VAE_CHOICES),
        Input("output_quality", 80, 1, 100),
        Input("control_image"),
        Input("controlnet", None, choices=tuple(CONTROLNETS)),
        Input("controlnet_conditioning_scale", None, 0.0, 2.0),
        Input("control_preprocess", True),
        Input("lora_weights"),
        Input("lora_scale", 1.0, 0.0, 2.0),
        Input("extra_lora"),
        Input("extra_lora_scale", 1.0, 0.0, 2.0),
        Input("disable_safety_checker", False),
    )
}
MAX_OUTPUTS = int(INPUTS["num_outputs"].high or 8)
MAX_SEED = int(INPUTS["seed"].high or 0)
# Past this, the memory of a decoded original is handed back once the inputs are fitted: the
# allocator would keep it, the worker staying at its peak (docs/serving.md).
LARGE_INPUT_PIXELS = 4_000_000
REFERENCE_PIXELS = 1024 * 1024  # a larger reference image is scaled down to this, as the klein pipelines do


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
    loras: tuple[tuple[LoraFile, float], ...] = ()  # the LoRAs applied for this request only, and their scales
    check_safety: bool = True  # false: disable_safety_checker
    controlnet: str | None = None  # canny or depth, with control_image
    control_image: Image.Image | None = None  # the map the ControlNet follows, at width x height
    conditioning_scale: float = 1.0  # how strongly it follows it
    references: tuple[Image.Image, ...] = ()  # FLUX.2 [klein]'s reference images, at most 1 megapixel each
    references_digest: str | None = None  # their pixels' hash: requests share a call only with the same ones

    @property
    def pipeline_key(self) -> PipelineKey:
        """Which of the loaded pipelines runs it (fastsd.pipelines.Pipelines.get)."""
        return (self.task, self.vae, self.controlnet)

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only above 1; LCM and turbo are meant to run without it."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class Served:
    """What this deployment serves, fixed at setup: the limits a request meets beyond its variant's."""

    variant: Variant
    vae_choices: tuple[str, ...] = VAE_CHOICES  # the tiny autoencoder only where it is installed
    controlnets: tuple[str, ...] = ()  # those FASTSD_CONTROLNETS named
    lora_rules: Rules | None = None  # None: user LoRAs are refused, for the reason below
    lora_refusal: str = "lora_weights and extra_lora are not served by this deployment."
    accepts_negative_prompt: bool = True  # the distilled LCM pipeline embeds guidance and takes none
    # The text encoders' limits (fastsd.prompts.PromptCache.check): syntax, chunks, passes.
    check_prompts: Callable[[str, str | None, bool], None] | None = None

    @property
    def default_vae(self) -> str:
        """The variant's default decoder, or the full one where its tiny one is not installed."""
        return self.variant.default_vae if self.variant.default_vae in self.vae_choices else FULL_VAE

    def negative_prompt(self, request: GenerationRequest) -> str | None:
        """The negative prompt the call uses: only with guidance, and where the pipeline takes one."""
        if request.negative_prompt and request.uses_guidance and self.accepts_negative_prompt:
            return request.negative_prompt
        return None


def validate(served: Served, **raw: Any) -> GenerationRequest:
    """Check every input and fill in its defaults (_validate). After a large image input the
    allocator's freed memory is handed back, once the decoded originals are garbage: when this
    returns, or fails (the failed call's locals cleared first)."""
    large: list[str] = []  # the image inputs _validate decoded that were large
    try:
        return _validate(served, raw, large)
    except InputError as error:
        if large:
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        if large:
            images.release_unused_memory()


def _validate(served: Served, raw: dict[str, Any], large: list[str]) -> GenerationRequest:
    """validate(), noting in large each image input past LARGE_INPUT_PIXELS or 8 MiB."""
    variant = served.variant
    unknown = [name for name in raw if name not in INPUTS]
    if unknown:
        raise InputError(f"{unknown[0]} is not an input; see the README's inputs table.", field=unknown[0])
    given = {name: raw.get(name, row.default) for name, row in INPUTS.items()}
    _refuse_what_is_not_served(served, given)  # before anything is fetched or decoded
    prompt, negative_prompt, chosen = _texts_and_loras(served, given)
    numbers = _numbers(served, given)
    source, area, control, controlnet, scale = _pictures(variant, given, large)
    width, height = size(variant, given["width"], given["height"], source if source is not None else control)
    if numbers["num_outputs"] * width * height > variant.max_batch_pixels:
        raise InputError(
            f"num_outputs x width x height must be at most {variant.max_batch_pixels} pixels for {variant.name}, "
            f"got {numbers['num_outputs']} x {width}x{height}; ask for fewer or smaller images.",
            field="num_outputs",
        )
    task = Task.TEXT_TO_IMAGE if source is None else Task.IMAGE_TO_IMAGE if area is None else Task.INPAINTING
    steps = _steps(variant, given["num_inference_steps"], task, numbers["strength"])
    fitted_area = None if area is None else images.fit(area, width, height)
    if given["mask"] is not None and fitted_area is not None and fitted_area.getextrema()[1] == 0:
        raise InputError("mask is all black: nothing to repaint; paint white where the image should change.",
                         field="mask")  # fmt: skip
    if control is not None:
        control = images.fit(control, width, height)
        if controlnet == CANNY and boolean("control_preprocess", given["control_preprocess"]):
            control = images.canny_edges(control)
    references = _references(variant, given, large)
    request = GenerationRequest(
        task=task,
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=None if source is None else images.fit(source, width, height),
        mask=fitted_area,
        num_inference_steps=steps,
        width=width,
        height=height,
        loras=chosen,
        check_safety=not boolean("disable_safety_checker", given["disable_safety_checker"]),
        controlnet=controlnet,
        control_image=control,
        conditioning_scale=scale,
        references=references,
        references_digest=images.digest(references) if references else None,
        **numbers,
    )
    if served.check_prompts is not None:  # a LoRA's new tokens are counted when they are encoded
        adds_tokens = any(lora.embeddings is not None for lora, _ in chosen)
        served.check_prompts(request.prompt, served.negative_prompt(request), not adds_tokens)
    return request


def _refuse_what_is_not_served(served: Served, given: dict[str, Any]) -> None:
    variant, wanted = served.variant, given["controlnet"]
    if wanted in CONTROLNETS and wanted not in variant.controlnet_choices():
        raise InputError(
            f"controlnet {wanted} is not available for {variant.name}: no {wanted} ControlNet is published for "
            f"{ARCHITECTURE_NAMES[variant.architecture]} models.",
            field="controlnet",
        )
    if wanted in CONTROLNETS and wanted not in served.controlnets:
        listed = ", ".join(served.controlnets) or "none"
        raise InputError(
            f"controlnet {wanted} is not served by this deployment (it serves: {listed}); it is chosen when "
            f"the container starts: {CONTROLNETS_ENV}={','.join((*served.controlnets, wanted))}.",
            field="controlnet",
        )
    if wanted and given["image"] is not None and variant.architecture not in CONTROLNET_IMAGE_TO_IMAGE:
        raise InputError(
            f"controlnet with image (image-to-image) is not available for {variant.name}: diffusers runs "
            f"{ARCHITECTURE_NAMES[variant.architecture]} ControlNets with text-to-image only; send control_image "
            "without image.",
            field="image",
        )
    if served.lora_rules is None and (given["lora_weights"] or given["extra_lora"]):
        raise InputError(served.lora_refusal, field="lora_weights")
    _refuse_what_the_model_ignores(variant, served, given)
    references = given["reference_images"]
    if references is not None and references != []:
        if variant.max_references == 0:
            raise InputError(
                f"reference_images is for the FLUX.2 [klein] presets (editing from reference images); {variant.name} "
                "has no such mode.",
                field="reference_images",
            )
        if not isinstance(references, list | tuple):
            raise InputError("reference_images must be a list of images (URLs or data URIs).", field="reference_images")
        if len(references) > variant.max_references:
            raise InputError(
                f"reference_images holds {len(references)} images; {variant.name} reads at most "
                f"{variant.max_references}.",
                field="reference_images",
            )


def _refuse_what_the_model_ignores(variant: Variant, served: Served, given: dict[str, Any]) -> None:
    """The transformers' presets refuse an input they cannot honour (the SD presets, for the
    clients written for them, log it instead: Engine.describe)."""
    if variant.has_unet:
        return
    if given["negative_prompt"] and not served.accepts_negative_prompt:
        raise InputError(
            f"negative_prompt has no effect on {variant.name}: it was distilled to run without classifier-free "
            "guidance; leave negative_prompt empty.",
            field="negative_prompt",
        )
    asked = given["guidance_scale"]
    if variant.recipe.guidance == DISTILLED and isinstance(asked, int | float) and asked != variant.guidance_scale:
        raise InputError(
            f"guidance_scale is fixed at {variant.guidance_scale:g} on {variant.name}: it was guidance-distilled "
            f"and ignores the value; leave guidance_scale out, got {asked!r}.",
            field="guidance_scale",
        )


def _texts_and_loras(served: Served, given: dict[str, Any]) -> tuple[str, str, tuple[tuple[LoraFile, float], ...]]:
    """The prompts, and each LoRA named (fetched and checked) with its scale; a Replicate training's
    placeholder ("TOK") in the prompts stands for its new tokens."""
    prompt = text("prompt", given["prompt"], required=True)
    negative_prompt = text("negative_prompt", given["negative_prompt"], required=False)
    chosen = []
    for name, scale_name in (("lora_weights", "lora_scale"), ("extra_lora", "extra_lora_scale")):
        reference = given[name]
        if reference is None or reference == "":
            continue
        if not isinstance(reference, str):
            raise InputError(f"{name} must be text: an https URL or a Hugging Face repo id.", field=name)
        scale = number(scale_name, given[scale_name])
        in_range(scale_name, scale, 0, 2)
        assert served.lora_rules is not None  # _refuse_what_is_not_served said so otherwise
        lora = loras.resolve(name, reference, served.lora_rules)
        variant = served.variant
        loras.require_architecture(
            name, lora, variant.architecture, variant.model if variant.is_custom else variant.name
        )
        chosen.append((lora, scale))
    if len(chosen) == 2 and chosen[0][0].digest == chosen[1][0].digest:
        raise InputError("extra_lora is the same file as lora_weights; raise lora_scale instead.", field="extra_lora")
    for lora, _ in chosen:
        for placeholder, tokens in lora.placeholders.items():
            prompt, negative_prompt = prompt.replace(placeholder, tokens), negative_prompt.replace(placeholder, tokens)
    return prompt, negative_prompt, tuple(chosen)


def _numbers(served: Served, given: dict[str, Any]) -> dict[str, Any]:
    """The inputs that are numbers or words, checked and with the variant's defaults."""
    variant = served.variant
    num_outputs = whole_number("num_outputs", given["num_outputs"])
    in_range("num_outputs", num_outputs, 1, MAX_OUTPUTS)
    output_format = choice("output_format", given["output_format"], OUTPUT_FORMATS)
    vae = choice("vae", served.default_vae if given["vae"] is None else given["vae"], VAE_CHOICES)
    if vae not in served.vae_choices:
        raise InputError(
            f"vae must be one of {', '.join(served.vae_choices)} on this deployment, got {vae!r}: "
            f"the tiny autoencoder {variant.tiny_vae} is not installed.",
            field="vae",
        )
    output_quality = whole_number("output_quality", given["output_quality"])
    in_range("output_quality", output_quality, 1, 100)
    seed = random.randint(0, MAX_SEED) if given["seed"] is None else whole_number("seed", given["seed"])
    in_range("seed", seed, 0, MAX_SEED)
    guidance = variant.guidance_scale if given["guidance_scale"] is None else given["guidance_scale"]
    guidance_scale = number("guidance_scale", guidance)
    in_range("guidance_scale", guidance_scale, 0, INPUTS["guidance_scale"].high or 0)
    strength = number("strength", given["strength"])
    in_range("strength", strength, 0, 1)
    return dict(num_outputs=num_outputs, output_format=output_format, vae=vae, output_quality=output_quality,
                seed=seed, guidance_scale=guidance_scale, strength=strength)  # fmt: skip


def _opened(source: Path | str | bytes, name: str, large: list[str]) -> Image.Image:
    decoded = images.open_input_image(source, name)
    if decoded.width * decoded.height > LARGE_INPUT_PIXELS or images.input_size(source) > 2**23:
        large.append(name)
    return decoded


def _pictures(variant: Variant, given: dict[str, Any], large: list[str]):
    """(the start image, the area to repaint, the control map, the ControlNet, its scale), decoded,
    not yet fitted. The area is the mask, or the image's transparent pixels (outpainting)."""
    source = None if given["image"] is None else _opened(given["image"], "image", large)
    area = None
    if given["mask"] is not None:
        if source is None:
            raise InputError("mask needs an image: it marks the part of image to repaint (white) and to keep (black).",
                             field="mask")  # fmt: skip
        area = images.as_mask(_opened(given["mask"], "mask", large), source.size)
    elif source is not None:
        area = images.transparent_area(source)
    if source is not None:
        source = images.flatten(source)
    control, controlnet, scale = _control(variant, given, large)
    if control is not None and area is not None:
        raise InputError("control_image does not combine with mask or a transparent image (inpainting); send one.",
                         field="control_image")  # fmt: skip
    return source, area, control, controlnet, scale


def _references(variant: Variant, given: dict[str, Any], large: list[str]) -> tuple[Image.Image, ...]:
    """The reference images, decoded, flattened and fitted to at most REFERENCE_PIXELS (what the
    klein pipelines read them at) in the model's multiples."""
    sources = given["reference_images"] or ()
    opened = (images.flatten(_opened(source, "reference_images", large)) for source in sources)
    return tuple(images.fit_within(image, REFERENCE_PIXELS, variant.size_multiple) for image in opened)


def _control(variant: Variant, given: dict[str, Any], large: list[str]):
    """The control image (decoded, not yet fitted), the ControlNet and its conditioning scale."""
    image, controlnet, scale = given["control_image"], given["controlnet"], given["controlnet_conditioning_scale"]
    if controlnet is not None:
        choice("controlnet", controlnet, tuple(CONTROLNETS))
    if image is None:
        if controlnet is not None:
            raise InputError(f"controlnet {controlnet} needs a control_image: the map the image should follow.",
                             field="controlnet")  # fmt: skip
        return None, None, CONDITIONING_SCALE[variant.architecture]
    if controlnet is None:
        raise InputError(f"control_image needs controlnet: one of {', '.join(CONTROLNETS)}, the kind of map it is.",
                         field="control_image")  # fmt: skip
    scale = number(
        "controlnet_conditioning_scale", CONDITIONING_SCALE[variant.architecture] if scale is None else scale
    )
    in_range("controlnet_conditioning_scale", scale, 0, 2)
    return images.flatten(_opened(image, "control_image", large)), controlnet, scale


def _steps(variant: Variant, asked: Any, task: Task, strength: float) -> int:
    """The steps to run: as asked, else the variant's (for image-to-image, as many as make the
    variant's count run at this strength, unless the recipe has fixed timesteps: strength then
    picks the last of those it runs)."""
    if asked is None:
        steps = variant.num_inference_steps
        if task is not Task.TEXT_TO_IMAGE and not variant.recipe.scheduler.timesteps:
            steps = steps_for_strength(steps, strength, variant.max_steps)
    else:
        steps = whole_number("num_inference_steps", asked)
        in_range("num_inference_steps", steps, 1, variant.max_steps)
    if task is not Task.TEXT_TO_IMAGE and int(steps * strength) < 1:
        raise InputError(
            f"strength x num_inference_steps must be at least 1 for {task}, got {strength:g} x {steps} "
            f"= {strength * steps:g}; raise strength to at least {1 / steps:.2g} or use more steps.",
            field="strength",
        )
    return steps
