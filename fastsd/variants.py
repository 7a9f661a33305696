"""The catalogue: every preset and every acceleration recipe, as data.

A recipe is what makes a base model fast: a UNet that replaces the base's, LoRAs fused into it
at setup, the scheduler (class, config overrides, fixed timesteps, eta), and the defaults a
request gets. A preset (Variant) is a base model with a recipe, a default size and limits. Any
SD1.5/SDXL fine-tune can take any recipe made for its architecture, and any fine-tune of the
transformer architectures (FLUX.1, FLUX.2 [klein], Z-Image) runs the schedule its configs say it
was distilled for (custom_variant). Adding a method is adding rows here (and its fixture in
fastsd_testing.random_models): no other module names a preset or a method. What differs between
architectures in code (their pipelines, text encoders, latents) is one module each in
fastsd.families.

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
FLUX1 = "flux1"  # FLUX.1: a 12B MMDiT, T5-XXL and CLIP-L, 16-channel latents in 2x2 patches
FLUX2_KLEIN = "flux2-klein"  # FLUX.2 [klein]: an MMDiT on Qwen3's hidden states, 32-channel latents
ZIMAGE = "z-image"  # Z-Image: a single-stream DiT on Qwen3's hidden states, FLUX.1's autoencoder
ARCHITECTURE_NAMES = {SD15: "SD 1.5", SD2: "SD 2.x", SDXL: "SDXL", FLUX1: "FLUX.1", FLUX2_KLEIN: "FLUX.2 [klein]",
                      ZIMAGE: "Z-Image"}  # fmt: skip
UNET_ARCHITECTURES = (SD15, SD2, SDXL)
# Width and height are multiples of this: the autoencoder's 8, times the 2x2 patches the
# transformers read their latents in.
SIZE_MULTIPLE = {SD15: 8, SD2: 8, SDXL: 8, FLUX1: 16, FLUX2_KLEIN: 16, ZIMAGE: 16}
# Reference images a request may give to edit from (the reference_images input): FLUX.2 [klein]'s.
# Each adds its tokens to every step (at 1 megapixel as many as a 1024x1024 image's own): 4 bounds it.
MAX_REFERENCES = {FLUX2_KLEIN: 4}

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' training scripts publish
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
# The tiny autoencoders (TAESD and its kin): a decoder ~18x cheaper than the full VAE's, the
# `vae=tiny` input. Z-Image decodes with FLUX.1's autoencoder, so TAEF1 serves both; FLUX.2's
# latents have their own (fal's, 128 channels in its 2x2 patches).
TINY_VAE_FOR = {
    SD15: "madebyollin/taesd",
    SD2: "madebyollin/taesd",
    SDXL: "madebyollin/taesdxl",
    FLUX1: "madebyollin/taef1",
    ZIMAGE: "madebyollin/taef1",
    FLUX2_KLEIN: "fal/FLUX.2-Tiny-AutoEncoder",
}
FULL_VAE, TINY_VAE = "full", "tiny"
VAE_CHOICES = (FULL_VAE, TINY_VAE)

# ControlNets by conditioning and architecture (diffusers format, under weights/<hub id>/). An
# image serves those FASTSD_CONTROLNETS names; none by default, so that an image stays small. A
# union ControlNet (one model, many conditionings) serves several names from one repo, loaded once.
CANNY, DEPTH = "canny", "depth"
FLUX1_UNION_CONTROLNET = "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0"  # no mode input: the map says it
ZIMAGE_UNION_CONTROLNET = "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0"  # its 2.1 file (below)
CONTROLNETS: dict[str, dict[str, str]] = {
    CANNY: {
        SD15: "lllyasviel/control_v11p_sd15_canny",
        SD2: "thibaud/controlnet-sd21-canny-diffusers",
        SDXL: "diffusers/controlnet-canny-sdxl-1.0",
        FLUX1: FLUX1_UNION_CONTROLNET,
        ZIMAGE: ZIMAGE_UNION_CONTROLNET,
    },
    DEPTH: {
        SD15: "lllyasviel/control_v11f1p_sd15_depth",
        SD2: "thibaud/controlnet-sd21-depth-diffusers",
        SDXL: "diffusers/controlnet-depth-sdxl-1.0",
        FLUX1: FLUX1_UNION_CONTROLNET,
        ZIMAGE: ZIMAGE_UNION_CONTROLNET,
    },
}


@dataclass(frozen=True)
class SingleFileControlNet:
    """A ControlNet published as one checkpoint and no config: diffusers' single-file loader reads it
    with the config of the repo it names for that checkpoint (fetched beside it: nothing at load)."""

    filename: str
    config_repo: str


# VideoX-Fun's Z-Image union ControlNet: the 2.1 checkpoint (15 control blocks, a refiner; canny,
# HED, depth, pose, MLSD) sits in the 2.0 repo.
SINGLE_FILE_CONTROLNETS = {
    ZIMAGE_UNION_CONTROLNET: SingleFileControlNet(
        "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors", "hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
    ),
}
# The architectures diffusers has a ControlNet image-to-image pipeline for (Z-Image: text-to-image only).
CONTROLNET_IMAGE_TO_IMAGE = (SD15, SD2, SDXL, FLUX1)
# controlnet_conditioning_scale when a request leaves it out: what the models' cards use (the SDXL
# cards recommend 0.5 "for good generalization"; the SD1.5 and SD2.1 ones run at diffusers' 1.0;
# the FLUX.1 union card 0.7 for canny, 0.8 for depth: the lower one; Z-Image's 0.65 to 0.80).
CONDITIONING_SCALE = {SD15: 1.0, SD2: 1.0, SDXL: 0.5, FLUX1: 0.7, FLUX2_KLEIN: 1.0, ZIMAGE: 0.75}
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


# What guidance_scale means to a recipe. CFG: classifier-free guidance above 1, with the negative
# prompt (SD, Z-Image); EMBEDDED: a value the model reads as an input, no negative prompt (the
# distilled LCM UNet, FLUX.1 [dev]); DISTILLED: none at all, the model was distilled at one value
# (FLUX.1 [schnell], FLUX.2 [klein]): a request's guidance_scale or negative_prompt is refused.
CFG, EMBEDDED, DISTILLED = "cfg", "embedded", "distilled"


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
    guidance: str = CFG
    # The text encoder's token budget, where the model card sets one (FLUX.1 [schnell]: 256).
    max_sequence_length: int | None = None


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
    realtime_side: int | None = None  # the realtime page's default size (None: width): fast before large
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
    def size_multiple(self) -> int:
        return SIZE_MULTIPLE[self.architecture]

    @property
    def max_references(self) -> int:
        return MAX_REFERENCES.get(self.architecture, 0)

    @property
    def has_unet(self) -> bool:
        return self.architecture in UNET_ARCHITECTURES

    @property
    def is_custom(self) -> bool:
        return self.name.startswith("custom:")

    def controlnet_repo(self, name: str) -> str:
        return CONTROLNETS[name][self.architecture]

    def controlnet_choices(self) -> tuple[str, ...]:
        """The ControlNets published for this architecture (those a deployment may serve)."""
        return tuple(name for name, by_architecture in CONTROLNETS.items() if self.architecture in by_architecture)

    def with_controlnets(self, names: tuple[str, ...]) -> Variant:
        unknown = [name for name in names if name not in CONTROLNETS]
        if unknown:
            raise ConfigurationError(
                f"{CONTROLNETS_ENV} names {', '.join(unknown)}; choose among: {', '.join(CONTROLNETS)} "
                "(comma-separated), or leave it empty."
            )
        missing = [name for name in names if name not in self.controlnet_choices()]
        if missing:
            raise ConfigurationError(
                f"{CONTROLNETS_ENV} names {', '.join(missing)}, but no {', '.join(missing)} ControlNet is published "
                f"for {ARCHITECTURE_NAMES[self.architecture]} models like {self.name}; leave it empty."
            )
        return replace(self, controlnets=tuple(dict.fromkeys(names)))

    def with_safety_checker(self, on: bool) -> Variant:
        return replace(self, safety_checker=on)


_TRAILING = (("timestep_spacing", "trailing"),)


def _lora(repo: str, filename: str = LORA_WEIGHT_NAME) -> tuple[Lora, ...]:
    return (Lora(HubFile(repo, filename)),)


# --- recipes ----------------------------------------------------------------------------------

TURBO = Recipe("turbo", 1, 0.0, Scheduler(config=_TRAILING), default_vae=TINY_VAE)
LCM_DISTILLED = Recipe("lcm", 4, 8.0, Scheduler("LCMScheduler"), guidance=EMBEDDED)  # embedded in the UNet
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

# The transformer architectures run the schedule their makers distilled them for; a fine-tune's
# configs say which (native_recipe). The cards' values: FLUX.2 [klein] 4 steps at guidance 1 (its
# undistilled "base" 50 at 4, with classifier-free guidance); Z-Image-Turbo 9 steps (8 transformer
# calls) without guidance; FLUX.1 [schnell] 4 steps without guidance, T5 read to 256 tokens; FLUX.1
# [dev] 28 steps at an embedded guidance of 3.5.
KLEIN_DISTILLED = Recipe("distilled", 4, 1.0, guidance=DISTILLED)
KLEIN_BASE = Recipe("none", 50, 4.0, max_steps=100)
ZIMAGE_TURBO = Recipe("turbo", 9, 0.0)
FLUX_SCHNELL = Recipe("schnell", 4, 0.0, guidance=DISTILLED, max_sequence_length=256)
FLUX_DEV = Recipe("none", 28, 3.5, guidance=EMBEDDED, max_steps=100)

# --- presets ----------------------------------------------------------------------------------

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
_XL: dict[str, Any] = dict(max_pixels=1536 * 1536, max_batch_pixels=8 * 1024 * 1024)
_XL_FAST: dict[str, Any] = dict(_XL, vae=SDXL_VAE_FP16_FIX)  # fp16-safe VAE: decodes in half precision, no upcast
# The transformers: up to 4 megapixels an image (what FLUX.2 and Z-Image were trained to; FLUX.1 to
# about 2), 4 megapixels a call (four 1024x1024 images).
_MEGAPIXELS_4: dict[str, Any] = dict(
    max_pixels=2048 * 2048, max_batch_pixels=4 * 1024 * 1024, max_batch_images=4, realtime_side=512
)
_MEGAPIXELS_2: dict[str, Any] = dict(_MEGAPIXELS_4, max_pixels=1536 * 1536)

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
        Variant("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", FLUX2_KLEIN, KLEIN_DISTILLED, 1024, 1024,
                **_MEGAPIXELS_4),
        Variant("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", ZIMAGE, ZIMAGE_TURBO, 1024, 1024, **_MEGAPIXELS_4),
        Variant("flux-schnell", "black-forest-labs/FLUX.1-schnell", FLUX1, FLUX_SCHNELL, 1024, 1024, **_MEGAPIXELS_2),
    )
}  # fmt: skip
DEFAULT_VARIANT = "sd-turbo"

# A custom model of an architecture gets the size and limits of that architecture's presets (and
# the SDXL ones the fp16-safe VAE).
_CUSTOM_SHAPE: dict[str, dict[str, Any]] = {
    SD15: dict(width=512, height=512),
    SD2: dict(width=512, height=512),
    SDXL: dict(width=1024, height=1024, **_XL_FAST),
    FLUX1: dict(width=1024, height=1024, **_MEGAPIXELS_2),
    FLUX2_KLEIN: dict(width=1024, height=1024, **_MEGAPIXELS_4),
    ZIMAGE: dict(width=1024, height=1024, **_MEGAPIXELS_4),
}
# The pipeline class in a model's model_index.json -> its architecture, for the transformers.
_TRANSFORMER_PIPELINES = {"FluxPipeline": FLUX1, "Flux2KleinPipeline": FLUX2_KLEIN, "ZImagePipeline": ZIMAGE}
DEFAULT_ACCELERATION = "lcm-lora"  # for an SD1.5/SDXL fine-tune when FASTSD_ACCELERATION is unset


def get_variant(name: str, setting: str = "FASTSD_VARIANT") -> Variant:
    """The preset of that name; setting is where the name came from (a variable or an option), for
    the error."""
    try:
        return VARIANTS[name]
    except KeyError:
        given = f"{setting} {name!r}" if setting.startswith("--") else f"{setting}={name!r}"
        raise ConfigurationError(f"{given} is not a known variant; choose one of: {', '.join(VARIANTS)}.") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"{path} cannot be read as JSON ({error}).") from None


def detect_architecture(model_folder: Path) -> str:
    """The architecture of a diffusers-format model, read from its configs."""
    index_file = model_folder / "model_index.json"
    if not index_file.is_file():
        raise ConfigurationError(
            f"{model_folder} is not a model in diffusers format: model_index.json is missing ({index_file})."
        )
    pipeline_class = _read_json(index_file).get("_class_name")
    if pipeline_class in _TRANSFORMER_PIPELINES:
        return _TRANSFORMER_PIPELINES[pipeline_class]
    unet_config = model_folder / "unet" / "config.json"
    if not unet_config.is_file():
        supported = ", ".join(["SD 1.x/2.x", "SDXL", *(ARCHITECTURE_NAMES[a] for a in _TRANSFORMER_PIPELINES.values())])
        raise ConfigurationError(
            f"{model_folder} holds a {pipeline_class} without a unet/ folder; supported are {supported} models "
            "in diffusers format."
        )
    cross_attention_dim = _read_json(unet_config).get("cross_attention_dim")
    if "XL" in str(pipeline_class) or cross_attention_dim == 2048:
        return SDXL
    if pipeline_class in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline"):
        return SD2 if cross_attention_dim == 1024 else SD15
    raise ConfigurationError(f"{model_folder} holds a {pipeline_class}; only SD 1.x/2.x and SDXL models are supported.")


def native_recipe(architecture: str, model_folder: Path) -> Recipe:
    """The schedule a transformer fine-tune was distilled for, as its configs say: FLUX.2 [klein]'s
    model_index.json marks the distilled models; FLUX.1's transformer takes a guidance embedding
    in [dev] and its fine-tunes, none in [schnell]."""
    if architecture == FLUX2_KLEIN:
        return KLEIN_DISTILLED if _read_json(model_folder / "model_index.json").get("is_distilled") else KLEIN_BASE
    if architecture == FLUX1:
        transformer = _read_json(model_folder / "transformer" / "config.json")
        return FLUX_DEV if transformer.get("guidance_embeds") else FLUX_SCHNELL
    return ZIMAGE_TURBO


def accelerations_for(architecture: str) -> list[str]:
    return [name for name, by_architecture in ACCELERATIONS.items() if architecture in by_architecture]


def custom_variant(model: str, model_folder: Path, acceleration: str | None = None) -> Variant:
    """A preset for any SD 1.5, SD 2.x or SDXL model with the acceleration asked for (lcm-lora when
    none is), or for any FLUX.1, FLUX.2 [klein] or Z-Image model with its own schedule."""
    architecture = detect_architecture(model_folder)
    name = ARCHITECTURE_NAMES[architecture]
    if architecture not in UNET_ARCHITECTURES:
        if acceleration not in (None, "none"):
            raise ConfigurationError(
                f"FASTSD_ACCELERATION={acceleration} does not apply to {model}, a {name} model: it runs the schedule "
                "its configs say it was distilled for; leave FASTSD_ACCELERATION unset."
            )
        return Variant(
            f"custom:{model}", model, architecture, native_recipe(architecture, model_folder),
            **_CUSTOM_SHAPE[architecture],
        )  # fmt: skip
    acceleration = acceleration or DEFAULT_ACCELERATION
    if acceleration not in ACCELERATIONS:
        raise ConfigurationError(
            f"FASTSD_ACCELERATION={acceleration!r} is not allowed; choose one of: {', '.join(ACCELERATIONS)}."
        )
    recipe = ACCELERATIONS[acceleration].get(architecture)
    if recipe is None:
        raise ConfigurationError(
            f"FASTSD_ACCELERATION={acceleration} does not exist for {model}, an {name} "
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
    found += [KLEIN_DISTILLED, KLEIN_BASE, ZIMAGE_TURBO, FLUX_SCHNELL, FLUX_DEV]
    return list(dict.fromkeys(found))
