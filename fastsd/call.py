"""A pipeline call's arguments for a batch of requests, and what a request's log line says.

Each image gets its request's prompt embeddings and its own generator (image i of a request is
seed + i, alone or batched); the rest is the batch's shared key (fastsd.engine.batch_key) and
what the recipe's sampler takes at call time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from .inputs import GenerationRequest
from .results import Interrupted
from .tasks import Task
from .variants import Scheduler


def recipe_arguments(scheduler: Scheduler, steps: int, accepted: set[str]) -> dict[str, Any]:
    """What the recipe's sampler takes at call time: TCD's eta, DMD2's fixed timesteps (for the
    step count they were trained for; another count gets the scheduler's own spacing)."""
    arguments: dict[str, Any] = {}
    if scheduler.eta is not None and "eta" in accepted:
        arguments["eta"] = scheduler.eta
    if scheduler.timesteps and len(scheduler.timesteps) == steps and "timesteps" in accepted:
        arguments["timesteps"] = list(scheduler.timesteps)
    return arguments


def arguments(
    requests: Sequence[GenerationRequest],
    embeddings: dict[str, torch.Tensor],
    accepted: set[str],
    scheduler: Scheduler,
    interrupted: Callable[[], bool] | None,
) -> dict[str, Any]:
    """The call's keyword arguments: shared settings, per-image generators and inputs, the task's."""
    first = requests[0]
    per_image = [request for request in requests for _ in range(request.num_outputs)]
    called: dict[str, Any] = dict(
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        num_images_per_prompt=1,
        # One CPU generator per image: image i is reproducible alone with seed + i, on any device.
        generator=[torch.Generator("cpu").manual_seed(r.seed + i) for r in requests for i in range(r.num_outputs)],
        **embeddings,
        **recipe_arguments(scheduler, first.num_inference_steps, accepted),
    )
    if first.task is Task.TEXT_TO_IMAGE:
        called.update(width=first.width, height=first.height)
    else:
        called.update(image=[r.image for r in per_image], strength=first.strength)
    if first.task is Task.INPAINTING:
        called.update(mask_image=[r.mask for r in per_image], width=first.width, height=first.height)
    if first.controlnet:
        # Text-to-image takes the map as `image`; image-to-image keeps `image` for the start.
        called["image" if first.task is Task.TEXT_TO_IMAGE else "control_image"] = [r.control_image for r in per_image]
        called["controlnet_conditioning_scale"] = first.conditioning_scale
    if interrupted is not None and "callback_on_step_end" in accepted:

        def stop_when_asked(pipe, step, timestep, callback_kwargs):
            if interrupted():
                raise Interrupted()
            return callback_kwargs

        called["callback_on_step_end"] = stop_when_asked
    return called


def mask_share(mask: Image.Image) -> float:
    """How much of the image a mask repaints (grey counts in part)."""
    histogram = mask.histogram()
    return sum(level * count for level, count in enumerate(histogram)) / (255 * sum(histogram))


def describe(request: GenerationRequest, recipe: dict[str, Any]) -> str:
    """What a request runs, as its log line."""
    return (
        f"{request.task}: seed {request.seed}, {request.num_inference_steps} step(s), guidance "
        f"{request.guidance_scale:g}, {request.width}x{request.height}, {request.num_outputs} image(s), "
        f"vae {request.vae}"
        + (f", strength {request.strength:g}" if request.task is not Task.TEXT_TO_IMAGE else "")
        + (f", mask {mask_share(request.mask):.0%} of the image" if request.mask is not None else "")
        + (f", controlnet {request.controlnet} at {request.conditioning_scale:g}" if request.controlnet else "")
        + "".join(f", LoRA {lora.reference} at {scale:g}" for lora, scale in request.loras)
        + "".join(f", {name} {value}" for name, value in recipe.items())
    )
