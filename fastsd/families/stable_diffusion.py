"""SD 1.x/2.x and SDXL: a UNet (replaced by a recipe's where it has one), CLIP text encoders read
through compel (weighted and long prompts: fastsd.prompts), ControlNets, half precision in fp16."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigurationError
from ..loras.hotswap import UNET_LAYERS, SlotLayers
from ..prompts import PromptEncoder
from ..tasks import Task
from ..variants import SD2, SD15, SDXL, HubFile, Variant
from ..weights.layout import UNET, model_folder, repo_folder
from .base import Family

if TYPE_CHECKING:
    from ..inputs import GenerationRequest

# The diffusers pipeline class of each task, with and without a ControlNet, for SD 1.x/2.x and
# for SDXL. Image-to-image goes through the auto pipeline, which knows the LCM pipelines; the others
# take the Stable Diffusion ones, which also run LCM-distilled UNets (guidance embedding) and, for
# inpainting, 4-channel UNets (the latents are masked each step). None: text-to-image's own class.
_PIPELINE_CLASS = {
    (Task.TEXT_TO_IMAGE, False): (None, None),
    (Task.IMAGE_TO_IMAGE, False): ("AutoPipelineForImage2Image", "AutoPipelineForImage2Image"),
    (Task.INPAINTING, False): ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline"),
    (Task.TEXT_TO_IMAGE, True): ("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"),
    (Task.IMAGE_TO_IMAGE, True): ("StableDiffusionControlNetImg2ImgPipeline",
                                  "StableDiffusionXLControlNetImg2ImgPipeline"),
}  # fmt: skip


def _load_unet(variant: Variant, file: HubFile, dtype: torch.dtype, root: Path):
    """A UNet published as one safetensors file in diffusers' keys (SDXL-Lightning), built from the
    base's unet/config.json. Made on the meta device and given the file's tensors: no random
    initialisation of billions of weights only to overwrite them."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    path = repo_folder(root, UNET, file.repo) / file.filename
    config = UNet2DConditionModel.load_config(model_folder(root, variant.model) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    try:
        unet.load_state_dict(load_file(path), strict=True, assign=True)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise ConfigurationError(f"{path} does not fit the UNet of {variant.model} ({reason}).") from None
    return unet.to(dtype).eval()


class StableDiffusion(Family):
    name = "Stable Diffusion"
    architectures = (SD15, SD2, SDXL)
    denoiser = "unet"
    gpu_dtype = torch.float16
    channels_last = True
    transformer_tier = False

    def pipeline_class(self, task: Task, architecture: str, controlnet: bool) -> str | None:
        return _PIPELINE_CLASS[(task, controlnet)][architecture == SDXL]

    def base_components(self, variant: Variant, root: Path, dtype: torch.dtype) -> dict[str, Any]:
        unet = variant.recipe.unet
        return {"unet": _load_unet(variant, unet, dtype, root)} if unet else {}

    def prompts(self, pipeline, device: str, variant: Variant) -> PromptEncoder:
        return PromptEncoder(pipeline, device)

    def task_arguments(
        self, requests: Sequence[GenerationRequest], pipeline, accepted: set[str], generators: list
    ) -> dict[str, Any]:
        first = requests[0]
        per_image = [request for request in requests for _ in range(request.num_outputs)]
        called: dict[str, Any] = {}
        if first.task is Task.TEXT_TO_IMAGE:
            called.update(width=first.width, height=first.height)
        else:
            called.update(image=[r.image for r in per_image], strength=first.strength)
        if first.task is Task.INPAINTING:
            called.update(mask_image=[r.mask for r in per_image], width=first.width, height=first.height)
        if first.controlnet:
            # Text-to-image takes the map as `image`; image-to-image keeps `image` for the start.
            control = [r.control_image for r in per_image]
            called["image" if first.task is Task.TEXT_TO_IMAGE else "control_image"] = control
            called["controlnet_conditioning_scale"] = first.conditioning_scale
        return called

    def lora_slot_layers(self, denoiser) -> SlotLayers:
        return UNET_LAYERS

    def compiled_modules(self, pipeline, tiny_vae) -> list[torch.nn.Module]:
        return [pipeline.unet, pipeline.vae.decoder, *([tiny_vae.decoder] if tiny_vae else [])]


FAMILY = StableDiffusion()
