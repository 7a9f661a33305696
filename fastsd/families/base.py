"""The interface every architecture's module implements (see fastsd.families), and the helpers
that join a batch's embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..loras.hotswap import SlotLayers, block_layers
from ..tasks import Task
from ..variants import Variant

if TYPE_CHECKING:
    from ..inputs import GenerationRequest
    from ..prompts import Prompt


class Prompts(Protocol):
    """A family's prompt reader and encoder (fastsd.prompts.PromptCache keeps what it encodes)."""

    def encode(self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple = ()) -> dict[str, Any]:
        """The call's embedding arguments for one prompt (tensors with a batch of 1, or lists of 1)."""
        ...

    def check(self, prompt: Prompt, name: str) -> None:
        """Refuse, with one InputError sentence naming the input, a prompt the encoder cannot read."""
        ...

    def note(self, prompt: Prompt, name: str) -> str | None:
        """A log line for a request whose prompt the encoder reads differently than written, or None."""
        ...


class Family:
    """The defaults are those of the transformer families; stable_diffusion overrides most."""

    name = ""
    architectures: tuple[str, ...] = ()
    denoiser = "transformer"  # the pipeline component every step runs: what is compiled
    gpu_dtype = torch.bfloat16  # fp16 overflows in these transformers and their LLM/T5 encoders
    channels_last = False  # NHWC speeds convolutions: the UNets', not the transformers'
    tasks: tuple[Task, ...] = tuple(Task)
    controlnet_class = "ControlNetModel"  # the diffusers class of the architecture's ControlNets
    transformer_tier = True  # FASTSD_ATTENTION and FASTSD_FP8 apply (diffusers' attention dispatcher, torchao)

    def pipeline_class(self, task: Task, architecture: str, controlnet: bool) -> str | None:
        """The diffusers class of a task's pipeline; None: text-to-image's own (the base's)."""
        raise NotImplementedError

    def base_components(self, variant: Variant, root: Path, dtype: torch.dtype) -> dict[str, Any]:
        """Components the preset replaces in the base, loaded (a recipe's UNet)."""
        return {}

    def load_tiny_vae(self, folder: Path, dtype: torch.dtype):
        from diffusers import AutoencoderTiny

        return AutoencoderTiny.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)

    def prompts(self, pipeline, device: str, variant: Variant) -> Prompts:
        raise NotImplementedError

    def task_arguments(
        self, requests: Sequence[GenerationRequest], pipeline, accepted: set[str], generators: list
    ) -> dict[str, Any]:
        """The call's arguments for the batch's task: size, start images, masks, references
        (generators: the call's, one per image, for what a family draws itself)."""
        first = requests[0]
        per_image = [request for request in requests for _ in range(request.num_outputs)]
        called: dict[str, Any] = dict(width=first.width, height=first.height)
        if first.task is not Task.TEXT_TO_IMAGE:
            called.update(image=[r.image for r in per_image], strength=first.strength)
        if first.task is Task.INPAINTING:
            called["mask_image"] = [r.mask for r in per_image]
        if first.controlnet:  # the transformers' ControlNet pipelines take the map as control_image
            called.update(control_image=[r.control_image for r in per_image],
                          controlnet_conditioning_scale=first.conditioning_scale)  # fmt: skip
        return called

    def lora_slot_layers(self, denoiser) -> SlotLayers:
        """The layers a compiled denoiser's LoRA slots cover (fastsd.loras.hotswap)."""
        return block_layers(denoiser)

    def compiled_modules(self, pipeline, tiny_vae) -> list[torch.nn.Module]:
        """What torch.compile compiles: the denoiser and the decoders."""
        return [getattr(pipeline, self.denoiser), pipeline.vae.decoder, *([tiny_vae.decoder] if tiny_vae else [])]


def join_embeddings(encoded: Sequence[dict[str, Any]], counts: Sequence[int], accepted: set[str]) -> dict[str, Any]:
    """One call's embedding arguments from each request's (one per image: a request's repeated for
    each of its images). Tensors are concatenated on the batch; lists (Z-Image's prompts of their
    own lengths) are joined."""
    joined: dict[str, Any] = {}
    for name in encoded[0]:
        if name not in accepted:
            continue
        parts = [(embeddings[name], count) for embeddings, count in zip(encoded, counts, strict=True)]
        if isinstance(parts[0][0], list):
            joined[name] = [item for value, count in parts for item in value for _ in range(count)]
        else:
            joined[name] = torch.cat([value.repeat_interleave(count, dim=0) for value, count in parts])
    return joined


def length_of(embeddings: dict[str, Any]) -> int:
    """The prompt's length in the call's terms: requests of different lengths cannot share a call
    when their embeddings are one padded tensor (CLIP's 77-token chunks); lists are any length."""
    prompt = embeddings["prompt_embeds"]
    return 0 if isinstance(prompt, list) else int(prompt.shape[1])
