"""FLUX.2 [klein] (4B, 9B, their base models and fine-tunes): a transformer on the hidden states of
three Qwen3 layers, FLUX.2's 32-channel autoencoder read in 2x2 patches (128 channels at 1/16 of
the image), normalised by the autoencoder's batch-norm statistics.

Reference images (editing, klein's headline) are the text-to-image pipeline's `image`; with a
mask they are the inpainting pipeline's `image_reference`. diffusers has no image-to-image klein
pipeline, so it is the text-to-image one given prepared latents and the tail of its schedule:
the start image encoded, noised to the first sigma that runs, and int(steps x strength) steps run,
as fastsd's image-to-image runs everywhere. The tiny autoencoder: flux2_tiny_vae.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..tasks import Task
from ..variants import DISTILLED, FLUX2_KLEIN, Variant
from .base import Family
from .plain_prompts import PlainPrompts
from .zimage import QWEN_BUDGET, chat_tokens

if TYPE_CHECKING:
    from ..inputs import GenerationRequest

_PIPELINE_CLASS = {Task.TEXT_TO_IMAGE: None, Task.IMAGE_TO_IMAGE: None, Task.INPAINTING: "Flux2KleinInpaintPipeline"}


class Flux2Klein(Family):
    name = "FLUX.2 [klein]"
    architectures = (FLUX2_KLEIN,)

    def pipeline_class(self, task: Task, architecture: str, controlnet: bool) -> str | None:
        return _PIPELINE_CLASS[task]

    def load_tiny_vae(self, folder: Path, dtype: torch.dtype):
        from .flux2_tiny_vae import Flux2TinyAutoencoder

        return Flux2TinyAutoencoder.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)

    def prompts(self, pipeline, device: str, variant: Variant) -> PlainPrompts:
        def embed(text: str, negative: str | None) -> dict[str, Any]:
            embedded = {"prompt_embeds": self._embed(pipeline, text, device)}
            if negative is not None and variant.recipe.guidance != DISTILLED:  # the base models' guidance
                embedded["negative_prompt_embeds"] = self._embed(pipeline, negative, device)
            return embedded

        return PlainPrompts(
            variant, "Qwen3 encoder", QWEN_BUDGET, lambda text: chat_tokens(pipeline.tokenizer, text, False), embed
        )

    @staticmethod
    def _embed(pipeline, text: str, device: str) -> torch.Tensor:
        embeds, _ = pipeline.encode_prompt(prompt=text, device=torch.device(device), num_images_per_prompt=1,
                                           max_sequence_length=QWEN_BUDGET)  # fmt: skip
        return embeds

    def task_arguments(
        self, requests: Sequence[GenerationRequest], pipeline, accepted: set[str], generators: list
    ) -> dict[str, Any]:
        first = requests[0]
        per_image = [request for request in requests for _ in range(request.num_outputs)]
        references = list(first.references) or None  # one batch_key: the same references
        called: dict[str, Any] = dict(width=first.width, height=first.height)
        if first.task is Task.INPAINTING:
            called.update(image=[r.image for r in per_image], mask_image=[r.mask for r in per_image],
                          strength=first.strength, image_reference=references)  # fmt: skip
            return called
        called["image"] = references
        if first.task is Task.IMAGE_TO_IMAGE:
            called.update(start_latents(pipeline, per_image, generators))
        return called


def start_latents(pipeline, per_image: Sequence[GenerationRequest], generators: list) -> dict[str, Any]:
    """Image-to-image on the text-to-image pipeline: the tail of its schedule (sigmas) and each
    image's start (latents): its encoding noised to the first sigma that runs, with its own
    generator's noise, drawn as the pipeline draws it."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    from diffusers.utils.torch_utils import randn_tensor

    first = per_image[0]
    steps = first.num_inference_steps
    run = int(steps * first.strength)  # inputs.validate makes it at least 1
    full = np.linspace(1.0, 1 / steps, steps)
    sigmas = full[steps - run :]
    height, width = first.height // 16, first.width // 16  # the patches' grid
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(sigmas=sigmas, mu=compute_empirical_mu(height * width, steps), device="cpu")
    start = float(scheduler.sigmas[0])
    device, dtype = pipeline._execution_device, pipeline.transformer.dtype
    latents = []
    for request, generator in zip(per_image, generators, strict=True):
        pixels = pipeline.image_processor.preprocess(request.image, height=first.height, width=first.width)
        encoded = pipeline._encode_vae_image(pixels.to(device, pipeline.vae.dtype), generator=None).float()
        noise = randn_tensor((1, *encoded.shape[1:]), generator=generator, device=device, dtype=dtype).float()
        latents.append((start * noise + (1 - start) * encoded).to(dtype))
    return {"latents": torch.cat(latents), "sigmas": sigmas.tolist()}


FAMILY = Flux2Klein()
