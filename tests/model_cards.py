"""The 2024 recipes written the way their model cards write them, with plain diffusers: the
reference the presets' images are compared with. Literal on purpose: none of it reads fastsd's
catalogue, so a wrong row there cannot agree with itself here.

The one departure from the cards: the SDXL presets swap in the fp16-safe VAE
(madebyollin/sdxl-vae-fp16-fix), so the reference gets the same VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import load_file

SD15 = "weights/stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "weights/stabilityai/stable-diffusion-xl-base-1.0"
DTYPE = torch.float32


def _fp16_fix(root: Path) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(root / "weights/madebyollin/sdxl-vae-fp16-fix", torch_dtype=DTYPE)


def sdxl_lightning(root: Path):
    # ByteDance/SDXL-Lightning: the 4-step UNet on the SDXL base, Euler with trailing timesteps.
    unet = UNet2DConditionModel.from_config(root / SDXL, subfolder="unet").to(DTYPE)
    unet.load_state_dict(load_file(root / "weights/ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(root / SDXL, unet=unet, vae=_fp16_fix(root), torch_dtype=DTYPE)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe, dict(num_inference_steps=4, guidance_scale=0)


def _hyper(root: Path, base: str, lora: str, **options):
    # ByteDance/Hyper-SD: the 1-step unified LoRA, fused, with the TCD scheduler at eta 1.0.
    pipe = DiffusionPipeline.from_pretrained(root / base, torch_dtype=DTYPE, **options)
    pipe.load_lora_weights(str(root / "lora/ByteDance/Hyper-SD"), weight_name=lora)
    pipe.fuse_lora()
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    return pipe, dict(num_inference_steps=1, guidance_scale=0, eta=1.0)


def hyper_sdxl(root: Path):
    return _hyper(root, SDXL, "Hyper-SDXL-1step-lora.safetensors", vae=_fp16_fix(root))


def hyper_sd15(root: Path):
    return _hyper(root, SD15, "Hyper-SD15-1step-lora.safetensors", safety_checker=None)


def _tcd(root: Path, base: str, lora: str, **options):
    # h1t/TCD-*-LoRA: TCD scheduler, LoRA fused, 4 steps, no guidance, eta (gamma) 0.3.
    pipe = DiffusionPipeline.from_pretrained(root / base, torch_dtype=DTYPE, **options)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(root / lora))
    pipe.fuse_lora()
    return pipe, dict(num_inference_steps=4, guidance_scale=0, eta=0.3)


def tcd_sdxl(root: Path):
    return _tcd(root, SDXL, "lora/h1t/TCD-SDXL-LoRA", vae=_fp16_fix(root))


def tcd_sd15(root: Path):
    return _tcd(root, SD15, "lora/h1t/TCD-SD15-LoRA", safety_checker=None)


def dmd2_sdxl(root: Path):
    # tianweiy/DMD2: the 4-step LoRA fused at scale 1, LCM scheduler, the timesteps it was trained on.
    pipe = DiffusionPipeline.from_pretrained(root / SDXL, vae=_fp16_fix(root), torch_dtype=DTYPE)
    pipe.load_lora_weights(str(root / "lora/tianweiy/DMD2"), weight_name="dmd2_sdxl_4step_lora_fp16.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe, dict(num_inference_steps=4, guidance_scale=0, timesteps=[999, 749, 499, 249])


CARDS = {
    "sdxl-lightning": sdxl_lightning,
    "hyper-sdxl": hyper_sdxl,
    "hyper-sd15": hyper_sd15,
    "tcd-sdxl": tcd_sdxl,
    "tcd-sd15": tcd_sd15,
    "dmd2-sdxl": dmd2_sdxl,
}
