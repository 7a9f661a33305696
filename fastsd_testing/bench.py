"""The benchmark scripts' shared harness: random full-size weights in the real layout, timing,
summaries, the device and versions, the JSON report written as a run goes, and the options every
benchmark takes with one meaning:

    --quick         tiny random models and few runs: a smoke run on a CPU (no figure to quote)
    --runs N        measured runs per case, after --warmup unmeasured ones
    --json PATH     where the report goes (default: benchmarks/<benchmark>-<device>-<weights>-<time>.json)
    --variant NAME  the preset (some benchmarks take several: --variants)
    --root PATH     where the random weights are built and kept between runs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from fastsd import images, variants
from fastsd.families import family_of
from fastsd.tasks import Task
from fastsd.weights import layout
from fastsd_testing import random_models
from fastsd_testing.cog_server import CogServer

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"


def add_options(parser: argparse.ArgumentParser, runs: int = 5, quick_runs: int = 10, several: bool = False) -> None:
    """The options every benchmark takes (module docstring)."""
    parser.add_argument("--quick", action="store_true", help="tiny random models, few runs: a smoke run on a CPU")
    parser.add_argument("--runs", type=int, help=f"measured runs per case (default {runs}, --quick {quick_runs})")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs first (default 2)")
    parser.add_argument("--json", type=Path, help="where the report goes (default: benchmarks/...)")
    parser.add_argument("--root", type=Path, help="where the random weights are built and kept")
    if several:
        parser.add_argument("--variants", nargs="+", default=["sd-turbo"], choices=list(variants.VARIANTS))
    else:
        parser.add_argument("--variant", default="sd-turbo", choices=list(variants.VARIANTS))
    parser.set_defaults(default_runs=runs, quick_runs=quick_runs)


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """The options' values once parsed: the weights' size, the runs, the root."""
    args.size = random_models.TINY if args.quick else random_models.FULL
    args.runs = args.runs or (args.quick_runs if args.quick else args.default_runs)
    args.root = args.root or Path.home() / ".cache" / "fastsd-benchmark" / f"{args.size}-fp16"
    return args


class Report:
    """The JSON a benchmark writes, as it goes: a run stopped at a time limit keeps what it measured."""

    def __init__(self, name: str, args: argparse.Namespace, device: str, dtype, **about) -> None:
        self.data: dict = {
            "benchmark": name,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": device_name(device),
            "dtype": str(dtype).removeprefix("torch."),
            "weights": args.size,
            "versions": versions(),
            **about,
        }
        self.path = args.json or Path("benchmarks") / f"{name}-{device}-{args.size}-{datetime.now():%Y%m%d-%H%M}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __getitem__(self, key: str):
        return self.data[key]

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value

    def write(self) -> Path:
        self.path.write_text(json.dumps(self.data, indent=2))
        return self.path


def inpainting_inputs(width: int, height: int) -> tuple:
    """A photo-like image and a mask whose middle third is white, as PIL images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 255
    return image, Image.fromarray(mask)


def drawing(width: int, height: int):
    """Shapes on white, for the canny ControlNet to find the edges of."""
    import numpy as np
    from PIL import Image

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    canvas[height // 5 : height // 2, width // 6 : width // 2] = (20, 40, 200)
    canvas[height // 2 : 4 * height // 5, width // 2 : 5 * width // 6] = (200, 30, 30)
    return Image.fromarray(canvas)


def png_data_uri(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def summary(seconds: list[float], images_per_call: int = 1) -> dict:
    median = statistics.median(seconds)
    return {
        "median_ms": round(median * 1000, 2),
        "min_ms": round(min(seconds) * 1000, 2),
        "max_ms": round(max(seconds) * 1000, 2),
        "runs": len(seconds),
        "images_per_s": round(images_per_call / median, 2),
    }


def timed(call, warmup: int, runs: int, device: str) -> list[float]:
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(runs):
        synchronize(device)
        started = time.perf_counter()
        call()
        synchronize(device)
        durations.append(time.perf_counter() - started)
    return durations


def timed_prediction(server: CogServer, **inputs) -> tuple[float, dict]:
    """One prediction through the server, end to end: (seconds, its metrics). Fails unless it succeeded."""
    started = time.perf_counter()
    response = server.predict(**inputs)
    elapsed = time.perf_counter() - started
    if response["status"] != "succeeded":
        raise RuntimeError(f"prediction failed: {response.get('error')}")
    return elapsed, response["metrics"]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or device


def build_random_weights(variant: variants.Variant, root: Path, size: str, device: str) -> None:
    """Random weights in the layout download_weights.py leaves (fp16 files where the repo has them).

    On a GPU the modules are initialised there: seconds instead of a minute of CPU time for each
    SDXL UNet, on a machine rented by the minute.
    """
    for source in layout.sources(variant):
        target = root / source.relative_folder / source.marker_name
        if target.exists():
            continue
        print(f"building {size} random weights for {source} under {root} ...", flush=True)
        started = time.perf_counter()
        staging = root / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        # LoRA factors come from a seeded CPU generator; everything else is made on the GPU.
        with torch.device(device if device == "cuda" and source.role != layout.LORA else "cpu"):
            random_models.build_source(source, staging, size, fp16_only=True)
        # Moved into place once complete: a build stopped halfway never passes for a finished one.
        # A source that is part of a folder (a file, the SD1.5 repo's checker folders) moves alone.
        for part in source.parts or ("",):
            built = staging / source.relative_folder / part
            target = root / source.relative_folder / part
            target.parent.mkdir(parents=True, exist_ok=True)
            built.rename(target)
        print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)


def too_large_here(variant: variants.Variant, size: str, device: str) -> str | None:
    """Why a full-size transformer preset cannot be measured on this CPU (its fp32 weights alone
    past the machine's memory), as a sentence for the report; None when it fits or is not one."""
    from fastsd_testing import transformer_models

    if size != random_models.FULL or device != "cpu" or variant.model not in transformer_models.PIPELINE_REPOS:
        return None
    needed = transformer_models.full_parameters(variant.model) * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed < 0.8 * memory:
        return None
    return (
        f"{variant.name} at full size needs {needed / 2**30:.0f} GiB for its fp32 weights alone; this machine has "
        f"{memory / 2**30:.0f} GiB: measured on the tiny models here (--quick), at full size on a GPU "
        "(scripts/gpu-benchmark)"
    )


def worker_peak_rss_mib(server: CogServer) -> float | None:
    """Peak resident memory of the server's worker process (the one that holds the model)."""
    try:
        import psutil

        children = psutil.Process(server.process.pid).children(recursive=True)
        peaks = []
        for child in children:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")]
        return round(max(peaks), 1) if peaks else None
    except (ImportError, OSError):
        return None


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def report_header(device: str, dtype, variant, size: str) -> dict:
    """What every benchmark's JSON starts with: when, on what, which model."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "variant": variant.name,
        "weights": size,
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "peft", "pillow", "coglet"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def bench_baseline(variant, root: Path, args, device: str, side: dict) -> dict:
    """What a user writes from the model card: AutoPipelineForText2Image with default settings,
    the recipe's UNet, LoRAs (fused) and scheduler; for the transformers, the repo's pipeline with
    the card's steps, guidance and sequence length, in bf16 on CUDA."""
    dtype = (torch.float16 if variant.has_unet else torch.bfloat16) if device == "cuda" else torch.float32
    pipe, extra, fp16 = _card_pipeline(variant, root, device, dtype)
    width, height = side.get("width", variant.width), side.get("height", variant.height)
    common = dict(prompt=PROMPT, guidance_scale=variant.guidance_scale, width=width, height=height, **extra)
    results: dict = {"dtype": str(dtype).removeprefix("torch.")}
    for name, batch in (("default", 1), (f"batch_{args.batch}", args.batch)):

        def call(pipe=pipe, batch=batch):
            pipe(num_inference_steps=variant.num_inference_steps, num_images_per_prompt=batch,
                 generator=torch.Generator("cpu").manual_seed(1), **common)  # fmt: skip

        runs = args.runs if batch == 1 else max(1, args.runs // 2)
        results[name] = summary(timed(call, args.warmup, runs, device), batch)
        print(f"  baseline {name:>10}: {results[name]['median_ms']:9.1f} ms median", flush=True)
        if args.quick or device == "cpu":
            break  # a batch of full-size images on a CPU takes minutes and says nothing new
    if "inpaint" in args.cases:
        results["inpaint"] = _baseline_inpaint(pipe, variant, args, device, common)
    if "controlnet" in args.cases and variant.controlnets:
        results["controlnet"] = _baseline_controlnet(pipe, variant, root, args, device, common)
    del pipe
    release(device)
    return results


def _card_pipeline(variant, root: Path, device: str, dtype):
    """The stock pipeline the model card builds, its extra call arguments, and whether fp16 files
    were loaded."""
    import diffusers
    from safetensors.torch import load_file

    recipe = variant.recipe
    folder = root / "weights" / variant.model
    if not variant.has_unet:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        length = recipe.max_sequence_length
        return pipe, {"max_sequence_length": length} if length else {}, False
    has_full = any(path for path in folder.glob("text_encoder/*.safetensors") if ".fp16." not in path.name)
    fp16 = any(folder.glob("text_encoder/*.fp16.safetensors")) and (device == "cuda" or not has_full)
    options = dict(torch_dtype=dtype, variant="fp16" if fp16 else None)
    if variant.vae:
        options["vae"] = diffusers.AutoencoderKL.from_pretrained(root / "weights" / variant.vae, torch_dtype=dtype)
    if recipe.unet:
        unet = diffusers.UNet2DConditionModel.from_config(folder / "unet").to(dtype)
        unet.load_state_dict(load_file(root / "weights" / recipe.unet.repo / recipe.unet.filename))
        options["unet"] = unet
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(folder, **options)
    for lora in recipe.loras:
        pipe.load_lora_weights(str(root / "lora" / lora.file.repo), weight_name=lora.file.filename)
        pipe.fuse_lora(lora_scale=lora.scale)
    if recipe.scheduler.name or recipe.scheduler.config:
        scheduler_class = getattr(diffusers, recipe.scheduler.name) if recipe.scheduler.name else type(pipe.scheduler)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **dict(recipe.scheduler.config))
    extra: dict = {"eta": recipe.scheduler.eta} if recipe.scheduler.eta is not None else {}
    if recipe.scheduler.timesteps:
        extra["timesteps"] = list(recipe.scheduler.timesteps)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra, fp16


def _baseline_inpaint(pipe, variant, args, device: str, common: dict) -> dict:
    """Stock inpainting over the same components, with the step count fastsd runs for the default
    strength (0.8): int(steps x strength) of them denoise, as in fastsd."""
    import diffusers

    if variant.has_unet:
        inpaint = diffusers.AutoPipelineForInpainting.from_pipe(pipe)
    else:  # the class fastsd serves the task with: the family's (diffusers' auto pipelines lack klein's)
        name = family_of(variant.architecture).pipeline_class(Task.INPAINTING, variant.architecture, False)
        inpaint = getattr(diffusers, name).from_pipe(pipe)
    image, mask = inpainting_inputs(common["width"], common["height"])
    steps = min(variant.max_steps, math.ceil(variant.num_inference_steps / 0.8 - 1e-9))

    def inpaint_call(pipe=inpaint):
        pipe(image=image, mask_image=mask, strength=0.8, num_inference_steps=steps,
             generator=torch.Generator("cpu").manual_seed(1), **common)  # fmt: skip

    result = summary(timed(inpaint_call, args.warmup, args.runs, device))
    print(f"  baseline {'inpaint':>10}: {result['median_ms']:9.1f} ms median", flush=True)
    return result


def _baseline_controlnet(pipe, variant, root: Path, args, device: str, common: dict) -> dict:
    """Stock ControlNet text-to-image over the same components and ControlNet weights: the card's
    code, with the edges found the way the cards find them (cv2.Canny 100/200)."""
    import diffusers

    from fastsd.pipelines import _load_controlnets

    family = family_of(variant.architecture)
    controlnet = _load_controlnets(variant.with_controlnets((variants.CANNY,)), family, pipe.dtype, root, device)
    guided_class = getattr(diffusers, family.pipeline_class(Task.TEXT_TO_IMAGE, variant.architecture, True))
    guided = guided_class.from_pipe(pipe, controlnet=controlnet[variants.CANNY])
    edges = images.canny_edges(drawing(common["width"], common["height"]))
    # The SD pipelines take the map as `image`; the transformers' as `control_image`.
    map_argument = "image" if family.controlnet_class == "ControlNetModel" else "control_image"

    def controlnet_call(pipe=guided):
        pipe(**{map_argument: edges}, num_inference_steps=variant.num_inference_steps,
             controlnet_conditioning_scale=variants.CONDITIONING_SCALE[variant.architecture],
             generator=torch.Generator("cpu").manual_seed(1), **common)  # fmt: skip

    result = summary(timed(controlnet_call, args.warmup, args.runs, device))
    print(f"  baseline {'controlnet':>10}: {result['median_ms']:9.1f} ms median", flush=True)
    return result
