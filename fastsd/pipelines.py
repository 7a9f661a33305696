"""Building the diffusers pipelines once: load, fuse the LCM-LoRA, set the scheduler, move to the device.

The text-to-image pipeline owns the weights; the image-to-image pipeline is made from the same
components (diffusers' from_pipe), so one copy of the weights serves both.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .variants import Variant
from .weights import LORA_WEIGHT_NAME, lora_folder, model_folder, require_weights

log = logging.getLogger(__name__)


@dataclass
class Pipelines:
    text_to_image: object
    image_to_image: object
    device: str
    dtype: torch.dtype
    accepts_negative_prompt: bool  # the distilled LCM pipeline embeds guidance and takes none


def select_device() -> tuple[str, torch.dtype]:
    """CUDA in fp16, else Apple MPS in fp16, else the CPU in fp32: the same code on each."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    if torch.backends.mps.is_available():
        return "mps", torch.float16
    return "cpu", torch.float32


def _component_folders(folder: Path) -> list[Path]:
    index = json.loads((folder / "model_index.json").read_text())
    return [folder / name for name, spec in index.items()
            if isinstance(spec, list) and spec[0] is not None and (folder / name).is_dir()]


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """"fp16" to load the *.fp16.safetensors files, None for the full-precision ones.

    Half precision loads the fp16 files when every component has them (half the bytes to read);
    full precision prefers the full-precision files, falling back to fp16 when a repo has only those.
    """
    with_weights = [path for path in _component_folders(folder) if any(path.glob("*.safetensors"))]
    has_fp16 = all(any(path.glob("*.fp16.safetensors")) for path in with_weights)
    has_full = all(any(not f.name.endswith(".fp16.safetensors") for f in path.glob("*.safetensors"))
                   for path in with_weights)
    if has_fp16 and (dtype == torch.float16 or not has_full):
        return "fp16"
    return None


def _fuse_lcm_lora(pipeline, variant: Variant) -> None:
    """Fuse the LoRA into the UNet weights once, then drop the adapter: no LoRA cost per step."""
    pipeline.load_lora_weights(str(lora_folder(variant.lora)), weight_name=LORA_WEIGHT_NAME, adapter_name="lcm")
    pipeline.fuse_lora(adapter_names=["lcm"], lora_scale=1.0)
    pipeline.unload_lora_weights()


def _set_scheduler(pipeline, variant: Variant) -> None:
    from diffusers import LCMScheduler

    scheduler = pipeline.scheduler
    if variant.use_lcm_scheduler and not isinstance(scheduler, LCMScheduler):
        scheduler = LCMScheduler.from_config(scheduler.config)
    if variant.timestep_spacing and scheduler.config.timestep_spacing != variant.timestep_spacing:
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=variant.timestep_spacing)
    pipeline.scheduler = scheduler


def load(variant: Variant, device: str | None = None, dtype: torch.dtype | None = None) -> Pipelines:
    from diffusers import AutoencoderKL, AutoPipelineForImage2Image, DiffusionPipeline

    if device is None:
        device, dtype = select_device()
    require_weights(variant)
    started = time.perf_counter()
    folder = model_folder(variant.model)
    options = dict(dtype=dtype, use_safetensors=True, local_files_only=True,
                   variant=weights_variant(folder, dtype))
    index = json.loads((folder / "model_index.json").read_text())
    if "safety_checker" in index:
        # Not loaded: the same behaviour for every variant (the turbo and SDXL repos have none).
        options.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if variant.vae:
        options["vae"] = AutoencoderKL.from_pretrained(model_folder(variant.vae), dtype=dtype,
                                                       use_safetensors=True, local_files_only=True)
    text_to_image = DiffusionPipeline.from_pretrained(folder, **options)
    if variant.lora:
        _fuse_lcm_lora(text_to_image, variant)
    _set_scheduler(text_to_image, variant)
    text_to_image.to(device)
    text_to_image.set_progress_bar_config(disable=True)
    image_to_image = AutoPipelineForImage2Image.from_pipe(text_to_image)
    image_to_image.set_progress_bar_config(disable=True)

    accepts_negative_prompt = "negative_prompt" in inspect.signature(text_to_image.__call__).parameters
    log.info(
        "loaded %s (%s%s%s) as %s + %s on %s in %s, scheduler %s, in %.1f s",
        variant.name, variant.model, f" + LoRA {variant.lora} (fused)" if variant.lora else "",
        f" + VAE {variant.vae}" if variant.vae else "", type(text_to_image).__name__,
        type(image_to_image).__name__, device, str(dtype).removeprefix("torch."),
        type(text_to_image.scheduler).__name__, time.perf_counter() - started,
    )
    return Pipelines(text_to_image, image_to_image, device, dtype, accepts_negative_prompt)
