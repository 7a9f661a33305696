"""The catalogue: every preset and every acceleration recipe, as data.

A recipe is what makes a base model fast: a UNet that replaces the base's, LoRAs fused into it
at setup, the scheduler (class, config overrides, fixed timesteps, eta), and the defaults a
request gets. A preset (Variant) is a base model with a recipe, a default size and limits. Any
SD1.5/SDXL fine-tune can take any recipe made for its architecture (custom_variant). Adding a
method is adding rows here (and its fixture in fastsd_testing.random_models): no other module
names a preset or a method.

Where each row comes from, and the weights' licences: docs/recipes.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .settings import Settings

# Architectures, as detected from a model's configs (detect_architecture).
SD15 = "sd1.5"  # SD 1.x: CLIP-L text encoder, cross-attention width 768
SD2 = "sd2"  # SD 2.x (sd-turbo): OpenCLIP-H, width 1024
SDXL = "sdxl"  # two text encoders, width 2048
ARCHITECTURE_NAMES = {SD15: "SD 1.5", SD2: "SD 2.x", SDXL: "SDXL"}

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' training scripts publish
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
# The tiny autoencoders (TAESD): a decoder ~18x cheaper than the full VAE's, the `vae=tiny` input.
TINY_VAE_FOR = {SD15: "madebyollin/taesd", SD2: "madebyollin/taesd", SDXL: "madebyollin/taesdxl"}
FULL_VAE, TINY_VAE = "full", "tiny"
VAE_CHOICES = (FULL_VAE, TINY_VAE)

# ControlNets by conditioning and architecture (diffusers format, under weights/<hub id>/). An
# image serves those FASTSD_CONTROLNETS names; none by default, so that an image stays small.
CANNY, DEPTH = "canny", "depth"
CONTROLNETS: dict[str, dict[str, str]] = {
    CANNY: {
        SD15: "lllyasviel/control_v11p_sd15_canny",
        SD2: "thibaud/controlnet-sd21-canny-diffusers",
        SDXL: "diffusers/controlnet-canny-sdxl-1.0",
    },
    DEPTH: {
        SD15: "lllyasviel/control_v11f1p_sd15_depth",
        SD2: "thibaud/controlnet-sd21-depth-diffusers",
        SDXL: "diffusers/controlnet-depth-sdxl-1.0",
    },
}
# controlnet_conditioning_scale when a request leaves it out: what the models' cards use (the SDXL
# cards recommend 0.5 "for good generalization"; the SD1.5 and SD2.1 ones run at diffusers' 1.0).
CONDITIONING_SCALE = {SD15: 1.0, SD2: 1.0, SDXL: 0.5}
CONTROLNETS_ENV = "FASTSD_CONTROLNETS"

# Safety checking (fastsd.safety), for every variant: the classic Stable Diffusion checker (the
# safety_checker/ and feature_extractor/ folders of the SD1.5 repo, the same model as
# CompVis/stable-diffusion-safety-checker) flags candidates, and a dedicated NSFW classifier
# decides. FASTSD_SAFETY_CHECKER=off leaves both out (a private deployment).
SAFETY_CHECKER_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
NSFW_CLASSIFIER_REPO = "Falconsai/nsfw_image_detection"
SAFETY_ENV = "FASTSD_SAFETY_CHECKER"


@dataclass(frozen=True)
class HubFile:
    """One file out of a hub repo that holds many (a LoRA, a replacement UNet); it is stored under
    its repo's own file name: lora/<repo>/<filename>, weights/<repo>/<filename>."""

    repo: str
    filename: str


@dataclass(frozen=True)
class Lora:
    file: HubFile
    scale: float = 1.0


@dataclass(frozen=True)
class Scheduler:
    """The sampler a recipe was distilled for."""

    name: str | None = None  # a diffusers scheduler class; None keeps the one the model ships
    config: tuple[tuple[str, Any], ...] = ()  # overrides of its config, e.g. timestep_spacing
    timesteps: tuple[int, ...] = ()  # the timesteps it was trained on, for that many steps
    eta: float | None = None  # stochasticity per step (TCD's gamma): a call argument


@dataclass(frozen=True)
class Recipe:
    """How a base becomes fast, and what a request gets when it leaves an input out."""

    name: str  # the FASTSD_ACCELERATION value that picks it for a custom model
    num_inference_steps: int
    guidance_scale: float
    scheduler: Scheduler = Scheduler()
    loras: tuple[Lora, ...] = ()  # fused into the UNet (and text encoders) at setup
    unet: HubFile | None = None  # replaces the base's UNet; its config is the base's unet/config.json
    # The decoder a request gets when it names none. For 1-step models the full VAE decoder is ~3x
    # the work of the UNet step (2515 vs 804 GFLOP at 512x512): the tiny one is the fast default.
    default_vae: str = FULL_VAE
    max_steps: int = 50


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # hub id (looked up under weights/) or a local diffusers folder
    architecture: str
    recipe: Recipe
    width: int
    height: int
    vae: str | None = None  # hub id of a VAE that replaces the model's own (under weights/)
    # Limits that keep one pipeline call's memory and time bounded.
    max_pixels: int = 1024 * 1024  # per image
    max_batch_pixels: int = 8 * 512 * 512  # all images of one call: one request's, or a batch of requests'
    max_batch_images: int = 8  # images in one call when concurrent requests are batched
    controlnets: tuple[str, ...] = ()  # the ControlNets this deployment serves (FASTSD_CONTROLNETS)
    safety_checker: bool = True  # the two checkers are loaded (FASTSD_SAFETY_CHECKER=off: not)

    @property
    def num_inference_steps(self) -> int:
        return self.recipe.num_inference_steps

    @property
    def guidance_scale(self) -> float:
        return self.recipe.guidance_scale

    @property
    def default_vae(self) -> str:
        return self.recipe.default_vae

    @property
    def max_steps(self) -> int:
        return self.recipe.max_steps

    @property
    def tiny_vae(self) -> str:
        """Hub id of the tiny autoencoder for this architecture: optional, loaded when present."""
        return TINY_VAE_FOR[self.architecture]

    @property
    def is_custom(self) -> bool:
        return self.name.startswith("custom:")

    def controlnet_repo(self, name: str) -> str:
        return CONTROLNETS[name][self.architecture]

    def with_controlnets(self, names: tuple[str, ...]) -> Variant:
        unknown = [name for name in names if name not in CONTROLNETS]
        if unknown:
            raise ConfigurationError(
                f"{CONTROLNETS_ENV} names {', '.join(unknown)}; choose among: {', '.join(CONTROLNETS)} "
                "(comma-separated), or leave it empty."
            )
        return replace(self, controlnets=tuple(dict.fromkeys(names)))

    def with_safety_checker(self, on: bool) -> Variant:
        return replace(self, safety_checker=on)


_TRAILING = (("timestep_spacing", "trailing"),)


def _lora(repo: str, filename: str = LORA_WEIGHT_NAME) -> tuple[Lora, ...]:
    return (Lora(HubFile(repo, filename)),)


# --- recipes ----------------------------------------------------------------------------------

TURBO = Recipe("turbo", 1, 0.0, Scheduler(config=_TRAILING), default_vae=TINY_VAE)
LCM_DISTILLED = Recipe("lcm", 4, 8.0, Scheduler("LCMScheduler"))  # guidance is embedded in the UNet
SDXL_LIGHTNING_UNET = Recipe(
    "lightning-unet", 4, 0.0, Scheduler("EulerDiscreteScheduler", _TRAILING),
    unet=HubFile("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors"),
)  # fmt: skip

# What FASTSD_ACCELERATION picks for a custom model, by architecture. An architecture missing
# from a row has no such acceleration.
ACCELERATIONS: dict[str, dict[str, Recipe]] = {
    "none": {
        SD15: Recipe("none", 25, 7.5, max_steps=100),
        SD2: Recipe("none", 25, 7.5, max_steps=100),
        SDXL: Recipe("none", 25, 7.0, max_steps=100),
    },
    "lcm-lora": {
        SD15: Recipe("lcm-lora", 4, 1.0, Scheduler("LCMScheduler"), _lora("latent-consistency/lcm-lora-sdv1-5")),
        SDXL: Recipe("lcm-lora", 4, 1.0, Scheduler("LCMScheduler"), _lora("latent-consistency/lcm-lora-sdxl")),
    },
    # The Lightning LoRA is what its authors recommend for SDXL fine-tunes (the UNet for the base).
    "lightning": {
        SDXL: Recipe(
            "lightning", 4, 0.0, Scheduler("EulerDiscreteScheduler", _TRAILING),
            _lora("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors"),
        ),
    },
    # Hyper-SD's 1-step "unified" LoRA, good from 1 to 8 steps with TCD (lower eta: more detail).
    "hyper": {
        SD15: Recipe(
            "hyper", 1, 0.0, Scheduler("TCDScheduler", eta=1.0),
            _lora("ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors"), max_steps=8,
        ),
        SDXL: Recipe(
            "hyper", 1, 0.0, Scheduler("TCDScheduler", eta=1.0),
            _lora("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors"), max_steps=8,
        ),
    },
    "tcd": {
        SD15: Recipe("tcd", 4, 0.0, Scheduler("TCDScheduler", eta=0.3), _lora("h1t/TCD-SD15-LoRA")),
        SDXL: Recipe("tcd", 4, 0.0, Scheduler("TCDScheduler", eta=0.3), _lora("h1t/TCD-SDXL-LoRA")),
    },
    # DMD2 was trained at four fixed timesteps; diffusers' LCM spacing for 4 steps differs.
    "dmd2": {
        SDXL: Recipe(
            "dmd2", 4, 0.0, Scheduler("LCMScheduler", timesteps=(999, 749, 499, 249)),
            _lora("tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors"),
        ),
    },
}  # fmt: skip

# --- presets ----------------------------------------------------------------------------------

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
_XL: dict[str, Any] = dict(max_pixels=1536 * 1536, max_batch_pixels=8 * 1024 * 1024)
_XL_FAST: dict[str, Any] = dict(_XL, vae=SDXL_VAE_FP16_FIX)  # fp16-safe VAE: decodes in half precision, no upcast

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sd-turbo", "stabilityai/sd-turbo", SD2, TURBO, 512, 512),
        Variant("sdxl-turbo", "stabilityai/sdxl-turbo", SDXL, TURBO, 512, 512, max_batch_pixels=8 * 1024 * 1024),
        Variant("sd15-lcm", SD15_BASE, SD15, ACCELERATIONS["lcm-lora"][SD15], 512, 512),
        Variant("sdxl-lcm", SDXL_BASE, SDXL, ACCELERATIONS["lcm-lora"][SDXL], 1024, 1024, **_XL_FAST),
        Variant("lcm-dreamshaper", "SimianLuo/LCM_Dreamshaper_v7", SD15, LCM_DISTILLED, 512, 512),
        Variant("sdxl-lightning", SDXL_BASE, SDXL, SDXL_LIGHTNING_UNET, 1024, 1024, **_XL_FAST),
        Variant("hyper-sdxl", SDXL_BASE, SDXL, ACCELERATIONS["hyper"][SDXL], 1024, 1024, **_XL_FAST),
        Variant("hyper-sd15", SD15_BASE, SD15, ACCELERATIONS["hyper"][SD15], 512, 512),
        Variant("tcd-sdxl", SDXL_BASE, SDXL, ACCELERATIONS["tcd"][SDXL], 1024, 1024, **_XL_FAST),
        Variant("tcd-sd15", SD15_BASE, SD15, ACCELERATIONS["tcd"][SD15], 512, 512),
        Variant("dmd2-sdxl", SDXL_BASE, SDXL, ACCELERATIONS["dmd2"][SDXL], 1024, 1024, **_XL_FAST),
        Variant("sd15", SD15_BASE, SD15, ACCELERATIONS["none"][SD15], 512, 512),
        Variant("sdxl", SDXL_BASE, SDXL, ACCELERATIONS["none"][SDXL], 1024, 1024, **_XL),
    )
}
DEFAULT_VARIANT = "sd-turbo"

# A custom model of an architecture gets the size and limits of that architecture's presets (and
# the SDXL ones the fp16-safe VAE).
_CUSTOM_SHAPE: dict[str, dict[str, Any]] = {
    SD15: dict(width=512, height=512),
    SD2: dict(width=512, height=512),
    SDXL: dict(width=1024, height=1024, **_XL_FAST),
}


def get_variant(name: str, setting: str = "FASTSD_VARIANT") -> Variant:
    """The preset of that name; setting is where the name came from (a variable or an option), for
    the error."""
    try:
        return VARIANTS[name]
    except KeyError:
        given = f"{setting} {name!r}" if setting.startswith("--") else f"{setting}={name!r}"
        raise ConfigurationError(f"{given} is not a known variant; choose one of: {', '.join(VARIANTS)}.") from None


def detect_architecture(model_folder: Path) -> str:
    """SD15, SD2 or SDXL for a diffusers-format model, read from its configs."""
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
        return SDXL
    if pipeline_class in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
        return SD2 if cross_attention_dim == 1024 else SD15
    raise ConfigurationError(f"{model_folder} holds a {pipeline_class}; only SD 1.x/2.x and SDXL models are supported.")


def accelerations_for(architecture: str) -> list[str]:
    return [name for name, by_architecture in ACCELERATIONS.items() if architecture in by_architecture]


def custom_variant(model: str, model_folder: Path, acceleration: str) -> Variant:
    """A preset for any SD 1.5, SD 2.x or SDXL model, with the acceleration asked for."""
    if acceleration not in ACCELERATIONS:
        raise ConfigurationError(
            f"FASTSD_ACCELERATION={acceleration!r} is not allowed; choose one of: {', '.join(ACCELERATIONS)}."
        )
    architecture = detect_architecture(model_folder)
    recipe = ACCELERATIONS[acceleration].get(architecture)
    if recipe is None:
        raise ConfigurationError(
            f"FASTSD_ACCELERATION={acceleration} does not exist for {model}, an {ARCHITECTURE_NAMES[architecture]} "
            f"model; for it choose one of: {', '.join(accelerations_for(architecture))}."
        )
    return Variant(f"custom:{model}", model, architecture, recipe, **_CUSTOM_SHAPE[architecture])


def variant_for(settings: Settings, model_folder_of) -> Variant:
    """The preset this server runs: Settings.model (with its acceleration) or Settings.variant, with
    the ControlNets and safety checking the settings name. model_folder_of maps a model reference
    to the folder its weights are in (a fine-tune's architecture is read from its configs)."""
    if settings.model:
        variant = custom_variant(settings.model, model_folder_of(settings.model), settings.acceleration)
    else:
        variant = get_variant(settings.variant)
    return variant.with_controlnets(settings.controlnets).with_safety_checker(settings.safety_checker)


def all_recipes() -> list[Recipe]:
    """Every recipe the catalogue knows: the presets' and the custom accelerations'."""
    found = [variant.recipe for variant in VARIANTS.values()]
    found += [recipe for by_architecture in ACCELERATIONS.values() for recipe in by_architecture.values()]
    return list(dict.fromkeys(found))
