"""Z-Image (Z-Image-Turbo and its fine-tunes): a single-stream transformer on Qwen3's
second-to-last hidden states, FLUX.1's autoencoder (so TAEF1 decodes it too). The prompt goes
through Qwen3's chat template, thinking on, as ZImagePipeline writes it; each prompt keeps its own
length (no padding), so requests of any prompt length share a call. VideoX-Fun's union ControlNet
(one checkpoint, read by diffusers' single-file loader) serves canny and depth with text-to-image."""

from __future__ import annotations

from typing import Any

import torch

from ..tasks import Task
from ..variants import ZIMAGE, Variant
from .base import Family
from .plain_prompts import PlainPrompts

_PIPELINE_CLASS = {
    (Task.TEXT_TO_IMAGE, False): None,
    (Task.IMAGE_TO_IMAGE, False): "ZImageImg2ImgPipeline",
    (Task.INPAINTING, False): "ZImageInpaintPipeline",
    (Task.TEXT_TO_IMAGE, True): "ZImageControlNetPipeline",  # the ControlNet shares the transformer's embedders
}
QWEN_BUDGET = 512  # the pipeline's max_sequence_length: the chat template's tokens included


def chat_tokens(tokenizer, text: str, thinking: bool) -> int:
    """How many tokens the Qwen3 pipelines give the encoder for a prompt: the chat template's too."""
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    return len(tokenizer(templated).input_ids)


class ZImage(Family):
    name = "Z-Image"
    architectures = (ZIMAGE,)
    controlnet_class = "ZImageControlNetModel"

    def pipeline_class(self, task: Task, architecture: str, controlnet: bool) -> str | None:
        return _PIPELINE_CLASS[(task, controlnet)]

    def prompts(self, pipeline, device: str, variant: Variant) -> PlainPrompts:
        def embed(text: str, negative: str | None) -> dict[str, Any]:
            # encode_prompt rewrites the list it is given: a fresh one each time.
            positive, negatives = pipeline.encode_prompt(
                prompt=[text], device=torch.device(device), do_classifier_free_guidance=negative is not None,
                negative_prompt=None if negative is None else [negative], max_sequence_length=QWEN_BUDGET,
            )  # fmt: skip
            embedded: dict[str, Any] = {"prompt_embeds": positive}
            if negative is not None:
                embedded["negative_prompt_embeds"] = negatives
            return embedded

        return PlainPrompts(
            variant, "Qwen3 encoder", QWEN_BUDGET, lambda text: chat_tokens(pipeline.tokenizer, text, True), embed
        )


FAMILY = ZImage()
