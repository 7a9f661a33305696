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
    embeddings: dict[str, Any],
    accepted: set[str],
    scheduler: Scheduler,
    interrupted: Callable[[], bool] | None,
    task_arguments: Callable[[list[torch.Generator]], dict[str, Any]],
) -> dict[str, Any]:
    """The call's keyword arguments: shared settings, per-image generators and embeddings, and the
    task's (task_arguments: the family's, given the generators)."""
    first = requests[0]
    # One CPU generator per image: image i is reproducible alone with seed + i, on any device.
    generators = [torch.Generator("cpu").manual_seed(r.seed + i) for r in requests for i in range(r.num_outputs)]
    called: dict[str, Any] = dict(
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        num_images_per_prompt=1,
        generator=generators,
        **embeddings,
        **recipe_arguments(scheduler, first.num_inference_steps, accepted),
    )
    called.update(task_arguments(generators))
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
        + (f", {len(request.references)} reference image(s)" if request.references else "")
        + "".join(f", LoRA {lora.reference} at {scale:g}" for lora, scale in request.loras)
        + "".join(f", {name} {value}" for name, value in recipe.items())
    )
