"""Building the diffusers pipelines once: load the base, apply the recipe (a replacement UNet,
LoRAs fused into the weights, the scheduler), move to the device.

The text-to-image pipeline owns the weights; the pipelines of the other tasks, and those that
decode with the tiny autoencoder, are made from the same components (diffusers' from_pipe), so
one copy of the weights serves them all.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigurationError
from .families import Family, family_of
from .loras.adapters import load_adapter
from .loras.hotswap import LoraSlots
from .safety import SafetyChecker
from .settings import BEST, REGIONAL, Settings, configure_libraries
from .tasks import PipelineKey, Task
from .variants import (
    ARCHITECTURE_NAMES,
    CFG,
    CONTROLNET_IMAGE_TO_IMAGE,
    FULL_VAE,
    SINGLE_FILE_CONTROLNETS,
    TINY_VAE,
    Lora,
    Scheduler,
    Variant,
)
from .weights.layout import CONTROLNET, LORA, model_folder, repo_folder
from .weights.provision import require_weights

log = logging.getLogger(__name__)

# Library messages that say nothing true about these models, printed on every start: diffusers 0.42
# warns of fp32 modules when the list is empty, and about a key its own AutoencoderTiny writes into
# config.json; the turbo repos' schedulers keep steps_offset 0, which only "leading" spacing reads.
_NOISE = ("should be kept in float32: [].", "were passed to AutoencoderTiny, but are not expected")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


def quiet_library_noise() -> None:
    """Keep a server's log to what matters: no loading progress bars, none of the messages above."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("diffusers.models.modeling_utils", "diffusers.configuration_utils"):
        library_log = logging.getLogger(name)
        if not any(isinstance(known, _DropNoise) for known in library_log.filters):
            library_log.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r"(?s).*`steps_offset` should be set to 1", category=FutureWarning)


# The tasks a ControlNet serves (inpainting keeps its own mask as the guide).
CONTROLNET_TASKS = (Task.TEXT_TO_IMAGE, Task.IMAGE_TO_IMAGE)


# A diffusers pipeline (StableDiffusionPipeline, ...): the library's classes carry no usable types.
DiffusionPipeline = Any


def call_parameters(pipeline: Any) -> set[str]:
    """What a pipeline's call takes (the recipe's and the task's arguments are passed where taken)."""
    return set(inspect.signature(pipeline.__call__).parameters)


@dataclass
class Pipelines:
    """Pipelines by (task, vae, ControlNet or None): all share one UNet and text encoders."""

    by_key: dict[PipelineKey, DiffusionPipeline]
    device: str
    dtype: torch.dtype
    accepts_negative_prompt: bool  # the distilled LCM pipeline embeds guidance and takes none
    safety: SafetyChecker | None = None  # None: FASTSD_SAFETY_CHECKER=off
    lora_slots: LoraSlots | None = None  # a compiled denoiser's slots for users' LoRAs (fastsd.loras.hotswap)
    compile_mode: str | None = None  # the torch.compile mode the models were compiled with (or regional)
    fp8: bool = False  # the denoiser's weights are fp8 (FASTSD_FP8)

    @property
    def text_to_image(self) -> DiffusionPipeline:
        return self.by_key[(Task.TEXT_TO_IMAGE, FULL_VAE, None)]

    @property
    def vae_choices(self) -> tuple[str, ...]:
        return tuple(sorted({vae for _, vae, _ in self.by_key}))

    @property
    def controlnets(self) -> tuple[str, ...]:
        return tuple(sorted({controlnet for _, _, controlnet in self.by_key if controlnet}))

    def get(self, task: Task, vae: str, controlnet: str | None = None) -> DiffusionPipeline:
        return self.by_key[(task, vae, controlnet)]


def _cpu_supports_bf16() -> bool:
    """bf16 halves CPU time where the cores compute it natively (AVX512-BF16 or AMX), and only there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device(dtype_name: str | None = None, half: torch.dtype = torch.float16) -> tuple[str, torch.dtype]:
    """CUDA in half precision (the family's: fp16 for the UNets, bf16 for the transformers), else
    Apple MPS likewise, else the CPU in bf16 where native, else fp32; a dtype named
    (Settings.dtype: float32, float16, bfloat16) overrides the precision."""
    if torch.cuda.is_available():
        device, dtype = "cuda", half
    elif torch.backends.mps.is_available():
        device, dtype = "mps", half
    else:
        device, dtype = "cpu", torch.bfloat16 if _cpu_supports_bf16() else torch.float32
    return device, _DTYPES[dtype_name] if dtype_name else dtype


def _component_folders(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    index = json.loads((folder / "model_index.json").read_text())
    return [
        folder / name
        for name, spec in index.items()
        if isinstance(spec, list) and spec[0] is not None and name not in skip and (folder / name).is_dir()
    ]


def weights_variant(folder: Path, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> str | None:
    """ "fp16" to load the *.fp16.safetensors files, None for the full-precision ones.

    Half precision (fp16, bf16) reads the fp16 files: half the bytes, and the values it keeps
    anyway. Full precision reads the full-precision files, unless a component has only fp16 ones.
    With "fp16", diffusers loads the full-precision file of any component that has no fp16 file.
    Components in skip (replaced by the preset) are not loaded and do not count.
    """
    with_weights = [path for path in _component_folders(folder, skip) if any(path.glob("*.safetensors"))]
    has_fp16 = [any(path.glob("*.fp16.safetensors")) for path in with_weights]
    has_full = [
        any(not f.name.endswith(".fp16.safetensors") for f in path.glob("*.safetensors")) for path in with_weights
    ]
    if not any(has_fp16):
        return None
    if dtype in (torch.float16, torch.bfloat16) or not all(has_full):
        return "fp16"
    return None


def _fuse_loras(pipeline, loras: tuple[Lora, ...], variant: Variant, root: Path) -> None:
    """Fuse each LoRA into the weights once, then drop the adapters: no LoRA cost per step.

    diffusers reads the key formats people publish (kohya, diffusers, peft). A file that fits no
    layer of this UNet (made for another architecture) is an error, never a silent no-op.
    """
    for index, lora in enumerate(loras):
        path = repo_folder(root, LORA, lora.file.repo) / lora.file.filename
        adapter = f"acceleration_{index}"
        problem = load_adapter(pipeline, path, adapter)
        if problem is not None:
            raise ConfigurationError(
                f"{path} is not a LoRA for {variant.model}, an {ARCHITECTURE_NAMES[variant.architecture]} model: "
                f"{problem}."
            )
        pipeline.fuse_lora(adapter_names=[adapter], lora_scale=lora.scale)
    if loras:
        pipeline.unload_lora_weights()


def _set_scheduler(pipeline, spec: Scheduler) -> None:
    import diffusers

    scheduler = pipeline.scheduler
    wanted = getattr(diffusers, spec.name) if spec.name else type(scheduler)
    overrides = dict(spec.config)
    if wanted is not type(scheduler) or any(scheduler.config.get(key) != value for key, value in overrides.items()):
        scheduler = wanted.from_config(scheduler.config, **overrides)
    pipeline.scheduler = scheduler


def compile_mode(setting: str | None) -> str | None:
    """The torch.compile mode for Settings.compile: off by default on every device, from
    measurements (docs/performance.md: on CUDA reduce-overhead halves a request but compiles again,
    for a minute, at every new shape); on: the device's best measured mode, reduce-overhead on CUDA
    (Inductor plus CUDA graphs), default elsewhere."""
    if setting == BEST:
        return "reduce-overhead" if torch.cuda.is_available() else "default"
    return setting


def _use_channels_last(modules, device: str) -> None:
    """NHWC lets the convolution kernels (cuDNN, oneDNN) skip a layout change around every conv.

    Faster on CUDA and the CPU for the UNet and both decoders (docs/performance.md); not on MPS,
    whose convolutions are not faster in it. (The transformers' families do not ask for it.)
    """
    if device == "mps":
        return
    for module in modules:
        module.to(memory_format=torch.channels_last)


def _compile(modules, device: str, mode: str, frozen: bool = True) -> None:
    """Compile in place (Module.compile), so every pipeline sharing a module gets the compiled one.

    Compilation happens at the first call of each shape: Engine.warm_up runs the served default in
    setup. Inductor's cache (settings.configure_libraries: beside the weights) lets the next cold
    boot skip most of the work.
    """
    import torch._inductor.config as inductor_config

    # Where the weights never change after setup (no LoRA slots), freezing folds them into the
    # graph as constants and prepacks them for oneDNN once, rather than at every call (CPU only).
    inductor_config.freezing = device == "cpu" and frozen
    if mode == REGIONAL:
        # Regional compilation (diffusers' compile_repeated_blocks): only the blocks a model repeats
        # (the UNet's transformer blocks; one compile serves every copy), Inductor's default mode; the
        # ResNets and the decoders stay eager, or graphed with FASTSD_GRAPHS=on.
        modules = [module for module in modules if getattr(module, "_repeated_blocks", None)]
        for module in modules:
            module.compile_repeated_blocks()
    else:
        for module in modules:
            module.compile(mode=mode)
    log.info("compiled %d modules with torch.compile mode %s", len(modules), mode)


def _load_tiny_vae(variant: Variant, family: Family, dtype: torch.dtype, root: Path):
    """The tiny autoencoder, or None when it is not installed (then only vae=full is served)."""
    folder = model_folder(root, variant.tiny_vae)
    if not (folder / "config.json").is_file():
        log.info("tiny VAE %s not installed (%s): vae=tiny is unavailable", variant.tiny_vae, folder)
        return None
    return family.load_tiny_vae(folder, dtype)


def _task_pipeline(task: Task, variant: Variant, family: Family, text_to_image, dtype: torch.dtype, **components):
    """The task's pipeline over text_to_image's components (with the given ones swapped in: a
    ControlNet, the tiny VAE).

    from_pipe shares the components; it also casts them all to its dtype argument, float32 unless
    told otherwise, so the dtype is always passed.
    """
    import diffusers

    name = family.pipeline_class(task, variant.architecture, "controlnet" in components)
    pipeline_class = getattr(diffusers, name) if name else type(text_to_image)
    return pipeline_class.from_pipe(text_to_image, dtype=dtype, **components)


def _load_controlnets(variant: Variant, family: Family, dtype: torch.dtype, root: Path, device: str) -> dict:
    """The served ControlNets by name, in the precision the pipeline runs (their fp16 files where
    published); a union ControlNet serving several names is loaded once."""
    import diffusers

    by_repo = {}
    for repo in dict.fromkeys(variant.controlnet_repo(name) for name in variant.controlnets):
        folder = repo_folder(root, CONTROLNET, repo)
        controlnet_class = getattr(diffusers, family.controlnet_class)
        single = SINGLE_FILE_CONTROLNETS.get(repo)
        if single:
            by_repo[repo] = controlnet_class.from_single_file(
                str(folder / single.filename), config=str(repo_folder(root, CONTROLNET, single.config_repo)),
                local_files_only=True, dtype=dtype,
            ).to(device)  # fmt: skip
            continue
        half = dtype in (torch.float16, torch.bfloat16)
        full = [path for path in folder.glob("*.safetensors") if not path.name.endswith(".fp16.safetensors")]
        fp16 = any(folder.glob("*.fp16.safetensors")) and (half or not full)
        by_repo[repo] = controlnet_class.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, variant="fp16" if fp16 else None
        ).to(device)  # fmt: skip
    return {name: by_repo[variant.controlnet_repo(name)] for name in variant.controlnets}


def load(
    variant: Variant, settings: Settings, device: str | None = None, dtype: torch.dtype | None = None
) -> Pipelines:
    """Every pipeline the variant serves, on one copy of the weights, on the device."""
    family = family_of(variant.architecture)
    if device is None or dtype is None:
        chosen_device, chosen_dtype = select_device(settings.dtype, family.gpu_dtype)
        device, dtype = device or chosen_device, dtype or chosen_dtype
    root = settings.weights_root
    require_weights(variant, root)
    quiet_library_noise()
    started = time.perf_counter()
    # 1. The base with the recipe applied: text-to-image, which owns the weights.
    text_to_image = _base_pipeline(variant, family, root, dtype)
    text_to_image.to(device)
    # 2. What it shares them with: the tiny autoencoder, the ControlNets, every task's pipeline.
    tiny_vae = _load_tiny_vae(variant, family, dtype, root)
    if tiny_vae is not None:
        tiny_vae.to(device)  # ~10 MB; everything else is shared, not a second model
    controlnets = _load_controlnets(variant, family, dtype, root, device)
    by_key = _task_pipelines(variant, family, text_to_image, tiny_vae, controlnets, dtype)
    # 3. How the models run: channels last, compiled (with LoRA slots) where asked.
    denoiser = getattr(text_to_image, family.denoiser)
    if family.channels_last:
        _use_channels_last([denoiser, text_to_image.vae, *([tiny_vae] if tiny_vae else []), *controlnets.values()],
                           device)  # fmt: skip
    fp8 = _transformer_tier(variant, family, denoiser, settings, device)
    lora_slots = None
    mode = compile_mode(settings.compile)
    if mode:
        configure_libraries(settings, compiling=True)
        if settings.lora_max_rank and not fp8:  # before compiling: the slots are in the graph
            lora_slots = LoraSlots(denoiser, settings.lora_max_rank, family.lora_slot_layers(denoiser), family.denoiser)
        _compile(family.compiled_modules(text_to_image, tiny_vae), device, mode, frozen=lora_slots is None)
    # 4. The safety checkers.
    parameters = call_parameters(text_to_image)
    loaded = Pipelines(
        by_key,
        device,
        dtype,
        accepts_negative_prompt=variant.recipe.guidance == CFG
        and bool({"negative_prompt", "negative_prompt_embeds"} & parameters),
        safety=SafetyChecker.load(variant, root, device, dtype),
        lora_slots=lora_slots,
        compile_mode=mode,
        fp8=fp8,
    )
    _log_loaded(variant, loaded, time.perf_counter() - started)
    return loaded


def _transformer_tier(variant: Variant, family: Family, denoiser, settings: Settings, device: str) -> bool:
    """The opt-in GPU tier of the transformers: their attention kernel (FASTSD_ATTENTION, diffusers'
    dispatcher) and fp8 weights (FASTSD_FP8, torchao). True when the weights became fp8."""
    if not (settings.attention or settings.fp8):
        return False
    if not family.transformer_tier:
        log.info("FASTSD_ATTENTION and FASTSD_FP8 cover the transformer presets; %s runs without them", variant.name)
        return False
    if settings.attention:
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = [backend.value for backend in AttentionBackendName]
        if settings.attention not in known:
            raise ConfigurationError(
                f"FASTSD_ATTENTION={settings.attention!r} is not an attention backend diffusers knows; choose one of: "
                f"{', '.join(known)}."
            )
        try:
            denoiser.set_attention_backend(settings.attention)
        except (RuntimeError, ValueError, ImportError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigurationError(f"FASTSD_ATTENTION={settings.attention} cannot run here: {reason}") from None
    if settings.fp8:
        _quantize_fp8(denoiser, device)
    return settings.fp8


def _quantize_fp8(module, device: str) -> None:
    """The module's linear layers in fp8 (torchao): with fp8 matmuls (dynamic activation scales)
    where the GPU computes them (compute capability 8.9: Ada, Hopper and newer), else stored in fp8
    and computed in the module's precision (half the weights' memory, no speed: what a CPU can
    check for correctness)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, quantize_

    computes = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    quantize_(module, Float8DynamicActivationFloat8WeightConfig() if computes else Float8WeightOnlyConfig())
    log.info("fp8 weights for the %s (%s)", type(module).__name__,
             "fp8 matmuls" if computes else "stored in fp8, computed in the model's precision")  # fmt: skip


def _base_pipeline(variant: Variant, family: Family, root: Path, dtype: torch.dtype):
    """The base model with its recipe: a replacement UNet or VAE, LoRAs fused, the scheduler."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    recipe = variant.recipe
    folder = model_folder(root, variant.model)
    replaced = tuple(name for name, by in (("unet", recipe.unet), ("vae", variant.vae)) if by)
    options: dict[str, Any] = dict(
        dtype=dtype, use_safetensors=True, local_files_only=True, variant=weights_variant(folder, dtype, replaced)
    )
    index = json.loads((folder / "model_index.json").read_text())
    if "safety_checker" in index:
        # Not loaded: the same behaviour for every variant (the turbo and SDXL repos have none).
        options.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if variant.vae:
        options["vae"] = AutoencoderKL.from_pretrained(
            model_folder(root, variant.vae), dtype=dtype, use_safetensors=True, local_files_only=True
        )
    options.update(family.base_components(variant, root, dtype))
    text_to_image = DiffusionPipeline.from_pretrained(folder, **options)
    _fuse_loras(text_to_image, recipe.loras, variant, root)
    _set_scheduler(text_to_image, recipe.scheduler)
    # The full VAE decodes (and encodes) a batch one image at a time: the same time, each image being
    # compute-bound already, and a peak that no longer grows with num_outputs (docs/performance.md).
    # The tiny VAE's activations are small; it keeps whole batches, which is what makes them fast.
    text_to_image.vae.enable_slicing()
    return text_to_image


def _task_pipelines(
    variant: Variant, family: Family, text_to_image, tiny_vae, controlnets: dict, dtype: torch.dtype
) -> dict:
    """A pipeline per (task, vae, ControlNet), over text_to_image's components."""
    by_key = {}
    for vae, vae_module in ((FULL_VAE, None), (TINY_VAE, tiny_vae)):
        if vae == TINY_VAE and tiny_vae is None:
            continue
        swapped = {"vae": vae_module} if vae_module is not None else {}
        for task in family.tasks:
            controlled = task is Task.TEXT_TO_IMAGE or variant.architecture in CONTROLNET_IMAGE_TO_IMAGE
            for controlnet in (None, *(controlnets if task in CONTROLNET_TASKS and controlled else ())):
                if task is Task.TEXT_TO_IMAGE and vae == FULL_VAE and controlnet is None:
                    pipeline = text_to_image
                else:
                    extra = {**swapped, **({"controlnet": controlnets[controlnet]} if controlnet else {})}
                    pipeline = _task_pipeline(task, variant, family, text_to_image, dtype, **extra)
                pipeline.set_progress_bar_config(disable=True)
                by_key[(task, vae, controlnet)] = pipeline
    return by_key


def _log_loaded(variant: Variant, loaded: Pipelines, seconds: float) -> None:
    recipe = variant.recipe
    applied = [f"UNet {recipe.unet.repo}/{recipe.unet.filename}"] if recipe.unet else []
    applied += [f"LoRA {lora.file.repo}/{lora.file.filename} (fused)" for lora in recipe.loras]
    applied += [f"VAE {variant.vae}"] if variant.vae else []
    applied += [f"ControlNet {name} ({variant.controlnet_repo(name)})" for name in loaded.controlnets]
    log.info(
        "loaded %s (%s, recipe %s%s) as %s on %s in %s, scheduler %s%s, vae choices %s, in %.1f s",
        variant.name,
        variant.model,
        recipe.name,
        "".join(f" + {part}" for part in applied),
        ", ".join(sorted({type(pipeline).__name__ for pipeline in loaded.by_key.values()})),
        loaded.device,
        str(loaded.dtype).removeprefix("torch."),
        type(loaded.text_to_image.scheduler).__name__,
        "".join(f", {key} {value}" for key, value in recipe.scheduler.config),
        "/".join(loaded.vae_choices),
        seconds,
    )
