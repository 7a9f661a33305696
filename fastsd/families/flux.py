"""FLUX.1 ([schnell], [dev] and their fine-tunes): a transformer on T5-XXL's token embeddings and
CLIP-L's pooled one, FLUX.1's 16-channel autoencoder, TAEF1 as the tiny one. diffusers' Flux
pipelines serve every task, and a FLUX.1-dev union ControlNet text-to-image and image-to-image;
the prompt is read by T5 up to the recipe's sequence length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..tasks import Task
from ..variants import FLUX1, Variant
from .base import Family
from .plain_prompts import PlainPrompts

if TYPE_CHECKING:
    from ..inputs import GenerationRequest

_PIPELINE_CLASS = {
    (Task.TEXT_TO_IMAGE, False): None,
    (Task.IMAGE_TO_IMAGE, False): "FluxImg2ImgPipeline",
    (Task.INPAINTING, False): "FluxInpaintPipeline",
    (Task.TEXT_TO_IMAGE, True): "FluxControlNetPipeline",
    (Task.IMAGE_TO_IMAGE, True): "FluxControlNetImg2ImgPipeline",
}
T5_BUDGET = 512  # what FluxPipeline reads at most
# The published FLUX.1 ControlNets are trained on [dev], whose guidance is an input: they read it
# even where the transformer takes none ([schnell]), at their cards' value.
CONTROLNET_GUIDANCE = 3.5


class Flux(Family):
    name = "FLUX.1"
    architectures = (FLUX1,)
    controlnet_class = "FluxControlNetModel"

    def pipeline_class(self, task: Task, architecture: str, controlnet: bool) -> str | None:
        return _PIPELINE_CLASS[(task, controlnet)]

    def task_arguments(
        self, requests: Sequence[GenerationRequest], pipeline, accepted: set[str], generators: list
    ) -> dict[str, Any]:
        called = super().task_arguments(requests, pipeline, accepted, generators)
        if requests[0].controlnet and not pipeline.transformer.config.guidance_embeds:
            called["guidance_scale"] = CONTROLNET_GUIDANCE
        return called

    def prompts(self, pipeline, device: str, variant: Variant) -> PlainPrompts:
        budget = variant.recipe.max_sequence_length or T5_BUDGET
        tokenizer = pipeline.tokenizer_2

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, verbose=False).input_ids)  # with T5's end-of-text token

        def embed(text: str, negative: str | None) -> dict[str, Any]:
            # No negative: these models take none (their guidance is distilled or embedded).
            prompt_embeds, pooled, _ = pipeline.encode_prompt(
                prompt=text, prompt_2=None, device=torch.device(device), num_images_per_prompt=1,
                max_sequence_length=budget,
            )  # fmt: skip
            return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

        return PlainPrompts(variant, "T5 encoder", budget, count_tokens, embed)


FAMILY = Flux()
