"""The catalogue of model presets, as data.

A preset says which weights to load, how to turn them into a fast pipeline (fused LCM-LoRA,
scheduler, replacement VAE) and what a request gets when it leaves an input out. A new preset
is one new row in VARIANTS; nothing else in the package names a preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigurationError

# Architectures, as detected from a model's files. "sd" is the SD 1.x/2.x UNet with one text
# encoder (StableDiffusionPipeline); "sdxl" is the two-encoder SDXL UNet.
SD = "sd"
SDXL = "sdxl"

# What a preset does to be fast.
NONE = "none"  # the plain model, many steps: the slow baseline
LCM_LORA = "lcm-lora"  # the base model with the LCM-LoRA fused into the UNet
DISTILLED = "distilled"  # the weights themselves are distilled (turbo, LCM Dreamshaper)

ACCELERATIONS = (NONE, LCM_LORA)  # what a user may ask for with a custom model

LCM_LORA_FOR = {
    # cross_attention_dim of the UNet -> the LCM-LoRA trained for that base
    768: "latent-consistency/lcm-lora-sdv1-5",
    2048: "latent-consistency/lcm-lora-sdxl",
}
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
# The tiny autoencoders (TAESD): a decoder ~18x cheaper than the full VAE's, the `vae=tiny` input.
TINY_VAE_FOR = {SD: "madebyollin/taesd", SDXL: "madebyollin/taesdxl"}
FULL_VAE, TINY_VAE = "full", "tiny"
VAE_CHOICES = (FULL_VAE, TINY_VAE)


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # hub id (looked up under weights/) or a local diffusers folder
    architecture: str
    acceleration: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    lora: str | None = None  # hub id of the LCM-LoRA fused at setup (under lora/)
    vae: str | None = None  # hub id of a VAE that replaces the model's own (under weights/)
    use_lcm_scheduler: bool = False  # else keep the scheduler the model ships with
    timestep_spacing: str | None = None  # turbo models are distilled for "trailing": enforce it
    # The decoder a request gets when it names none. For 1-step models the full VAE decoder is ~3x
    # the work of the UNet step (2515 vs 804 GFLOP at 512x512): the tiny one is the fast default.
    default_vae: str = FULL_VAE
    # Limits that keep one request's memory and time bounded.
    max_steps: int = 50
    max_pixels: int = 1024 * 1024  # per image
    max_batch_pixels: int = 8 * 512 * 512  # all images of one request together

    @property
    def tiny_vae(self) -> str:
        """Hub id of the tiny autoencoder for this architecture: optional, loaded when present."""
        return TINY_VAE_FOR[self.architecture]

    @property
    def hub_ids(self) -> dict[str, str]:
        """Every hub repo this preset needs, by role (the optional tiny VAE is not among them)."""
        roles = {"model": self.model, "lora": self.lora, "vae": self.vae}
        return {role: repo for role, repo in roles.items() if repo}


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "sd-turbo",
            "stabilityai/sd-turbo",
            SD,
            DISTILLED,
            1,
            0.0,
            512,
            512,
            timestep_spacing="trailing",
            default_vae=TINY_VAE,
        ),
        Variant(
            "sdxl-turbo",
            "stabilityai/sdxl-turbo",
            SDXL,
            DISTILLED,
            1,
            0.0,
            512,
            512,
            timestep_spacing="trailing",
            default_vae=TINY_VAE,
            max_batch_pixels=8 * 1024 * 1024,
        ),
        Variant(
            "sd15-lcm",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            SD,
            LCM_LORA,
            4,
            1.0,
            512,
            512,
            lora=LCM_LORA_FOR[768],
            use_lcm_scheduler=True,
        ),
        Variant(
            "sdxl-lcm",
            "stabilityai/stable-diffusion-xl-base-1.0",
            SDXL,
            LCM_LORA,
            4,
            1.0,
            1024,
            1024,
            lora=LCM_LORA_FOR[2048],
            vae=SDXL_VAE_FP16_FIX,
            use_lcm_scheduler=True,
            max_pixels=1536 * 1536,
            max_batch_pixels=8 * 1024 * 1024,
        ),
        Variant(
            "lcm-dreamshaper",
            "SimianLuo/LCM_Dreamshaper_v7",
            SD,
            DISTILLED,
            4,
            8.0,
            512,
            512,
            use_lcm_scheduler=True,
        ),
        Variant("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", SD, NONE, 25, 7.5, 512, 512, max_steps=100),
        Variant(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            SDXL,
            NONE,
            25,
            7.0,
            1024,
            1024,
            max_steps=100,
            max_pixels=1536 * 1536,
            max_batch_pixels=8 * 1024 * 1024,
        ),
    )
}
DEFAULT_VARIANT = "sd-turbo"

# A custom model takes its defaults and limits from the preset of the same kind.
_TEMPLATE_FOR = {(SD, NONE): "sd15", (SD, LCM_LORA): "sd15-lcm", (SDXL, NONE): "sdxl", (SDXL, LCM_LORA): "sdxl-lcm"}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigurationError(
            f"FASTSD_VARIANT={name!r} is not a known variant; choose one of: {', '.join(VARIANTS)}."
        ) from None


def detect_architecture(model_folder: Path) -> tuple[str, int]:
    """(architecture, cross_attention_dim) of a diffusers-format model, read from its configs."""
    index_file = model_folder / "model_index.json"
    unet_config = model_folder / "unet" / "config.json"
    for required in (index_file, unet_config):
        if not required.is_file():
            raise ConfigurationError(
                f"{model_folder} is not a Stable Diffusion model in diffusers format: {required.name} "
                f"is missing ({required})."
            )
    pipeline_class = json.loads(index_file.read_text())["_class_name"]
    cross_attention_dim = json.loads(unet_config.read_text())["cross_attention_dim"]
    if "XL" in pipeline_class or cross_attention_dim == 2048:
        return SDXL, 2048
    if pipeline_class in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
        return SD, cross_attention_dim
    raise ConfigurationError(f"{model_folder} holds a {pipeline_class}; only SD 1.x/2.x and SDXL models are supported.")


def custom_variant(model: str, model_folder: Path, acceleration: str) -> Variant:
    """A preset for any SD1.5- or SDXL-architecture model, with the matching LCM-LoRA if asked."""
    if acceleration not in ACCELERATIONS:
        raise ConfigurationError(
            f"FASTSD_ACCELERATION={acceleration!r} is not allowed; choose one of: {', '.join(ACCELERATIONS)}."
        )
    architecture, cross_attention_dim = detect_architecture(model_folder)
    template = VARIANTS[_TEMPLATE_FOR[(architecture, acceleration)]]
    lora = None
    if acceleration == LCM_LORA:
        lora = LCM_LORA_FOR.get(cross_attention_dim)
        if lora is None:
            raise ConfigurationError(
                f"{model} has a UNet with cross_attention_dim={cross_attention_dim} (SD 2.x); LCM-LoRA exists "
                f"only for SD1.5 (768) and SDXL (2048). Set FASTSD_ACCELERATION=none."
            )
    return dataclasses.replace(template, name=f"custom:{model}", model=model, lora=lora)


def variant_from_environment(model_folder_of) -> Variant:
    """The preset this server runs: FASTSD_MODEL (with FASTSD_ACCELERATION) or FASTSD_VARIANT.

    model_folder_of maps a model reference to the folder its weights are in.
    """
    model = os.environ.get("FASTSD_MODEL", "").strip()
    if model:
        acceleration = os.environ.get("FASTSD_ACCELERATION", LCM_LORA).strip()
        return custom_variant(model, model_folder_of(model), acceleration)
    return get_variant(os.environ.get("FASTSD_VARIANT", DEFAULT_VARIANT).strip() or DEFAULT_VARIANT)
