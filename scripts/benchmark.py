"""Benchmark fastsd end to end through the Cog server against stock diffusers, on this machine's device.

    python scripts/benchmark.py                      # sd-turbo, full-size random weights
    python scripts/benchmark.py --quick              # tiny models: a CPU smoke run and the server overhead
    python scripts/benchmark.py --variants sd-turbo sdxl-turbo sdxl-lcm --runs 20 --batch 8
    python scripts/benchmark.py --load 4 --requests 16     # 4 clients at once: batched vs one slot

Weights are random, in the real on-disk layout (fastsd_testing.random_models), built once under --root:
timing does not depend on the values, and nothing is downloaded. For each variant, in one run:

1. server: run() end to end as a user gets it, through the real Cog HTTP server (coglet),
   including input handling and output encoding: default inputs, vae=tiny, and a batch;
2. phases: prompt encoding, denoising, decoding and output encoding, in process;
3. baseline: the stock diffusers path a user would otherwise write (AutoPipelineForText2Image
   with default settings, the model card's steps and guidance) on the same weights.

Prints a table and writes JSON (medians after warm-up, min, max, images/s, peak memory, device,
dtype, library versions).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from fastsd import images, variants
from fastsd.engine import Engine
from fastsd.inputs import MAX_OUTPUTS
from fastsd.pipelines import select_device
from fastsd.tasks import Task
from fastsd.weights import layout
from fastsd_testing import random_models
from fastsd_testing.cog_server import CogServer, declared_concurrency, decode_output
from fastsd_testing.load import run_clients

CASES = ("default", "vae_full", "vae_tiny", "batch", "inpaint", "controlnet")
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"


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


def bench_server(variant, root: Path, cases: dict, args, log_dir: Path, results: dict) -> None:
    """Fills results as it goes, so a run stopped at a time limit still reports what it measured."""
    started = time.perf_counter()
    log_name = f"server-{variant.name}" + (f"-compile-{args.compile}" if args.compile else "") + ".log"
    environment = {"FASTSD_VARIANT": variant.name, "FASTSD_WEIGHTS_ROOT": str(root)}
    server = CogServer({**environment, "FASTSD_CONTROLNETS": ",".join(variant.controlnets)}, log_dir / log_name)
    try:
        state = server.wait_for_setup()
        if state["status"] != "READY":
            raise RuntimeError(f"setup failed: {server.log_path.read_text()[-3000:]}")
        # Start to READY: imports, loading, compiling (with FASTSD_COMPILE) and the warm-up.
        results["setup_s"] = round(time.perf_counter() - started, 1)
        print(f"  server        setup: {results['setup_s']:9.1f} s", flush=True)
        for name, inputs in cases.items():
            overheads = []

            def call(name=name, inputs=inputs, overheads=overheads):
                started = time.perf_counter()
                response = server.predict(prompt=PROMPT, seed=1, **inputs)
                if response["status"] != "succeeded":
                    raise RuntimeError(f"{name}: {response.get('error')}")
                decode_output(response["output"][0])
                # Everything but the pipeline call: HTTP, coglet, validation, output encoding, data URIs.
                overheads.append(time.perf_counter() - started - response["metrics"]["inference_time"])

            durations = timed(call, args.warmup, args.runs, "cpu")
            results[name] = dict(
                summary(durations, inputs.get("num_outputs", 1)),
                inputs={k: "a PNG data URI" if str(v).startswith("data:") else v for k, v in inputs.items()},
                overhead_median_ms=round(statistics.median(overheads[args.warmup :]) * 1000, 2),
            )
            print(f"  server {name:>12}: {results[name]['median_ms']:9.1f} ms median", flush=True)
        results["worker_peak_rss_mib"] = worker_peak_rss_mib(server)
    finally:
        server.stop()


class PhaseTimer:
    """Forward hooks that time each component call (with a device sync, so only for measuring)."""

    def __init__(self, device: str):
        self.device, self.totals, self.handles = device, {}, []

    def watch(self, name: str, module) -> None:
        def before(*_):
            synchronize(self.device)
            module._phase_started = time.perf_counter()

        def after(*_):
            synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - module._phase_started

        self.handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def bench_phases(variant, args, device: str, side: dict) -> dict:
    engine = Engine.load(variant)
    engine.warm_up()
    results = {"dtype": str(engine.pipelines.dtype).removeprefix("torch.")}
    for vae in engine.pipelines.vae_choices:
        pipeline = engine.pipelines.get(Task.TEXT_TO_IMAGE, vae)
        samples: dict[str, list[float]] = {}
        for run in range(args.warmup + args.runs):
            engine.prompts = type(engine.prompts)(pipeline, device)  # measure the text encoders every time
            timer = PhaseTimer(device)
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipeline, name, None) is not None:
                    timer.watch("prompt_encoding", getattr(pipeline, name))
            timer.watch("denoising", pipeline.unet)
            timer.watch("decoding", pipeline.vae.decoder)
            request = engine.validate(prompt=PROMPT, seed=1, vae=vae, **side)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            started = time.perf_counter()
            result = engine.generate(request)
            total = time.perf_counter() - started
            timer.remove()
            engine.save(result, request)
            if run >= args.warmup:
                for name, seconds in {
                    **timer.totals,
                    "output_encoding": result.timings["encode_time"],
                    "total_generate": total,
                }.items():
                    samples.setdefault(name, []).append(seconds)
        results[f"vae_{vae}"] = {name: round(statistics.median(values) * 1000, 2) for name, values in samples.items()}
        if device == "cuda":
            results[f"vae_{vae}"]["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(f"  phases vae={vae}: {results[f'vae_{vae}']}", flush=True)
    del engine
    release(device)
    return results


def bench_baseline(variant, root: Path, args, device: str, side: dict) -> dict:
    """What a user writes from the model card: AutoPipelineForText2Image with default settings,
    the recipe's UNet, LoRAs (fused) and scheduler."""
    import diffusers
    from safetensors.torch import load_file

    dtype = torch.float16 if device == "cuda" else torch.float32
    recipe = variant.recipe
    folder = root / "weights" / variant.model
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
    extra = {"eta": recipe.scheduler.eta} if recipe.scheduler.eta is not None else {}
    if recipe.scheduler.timesteps:
        extra["timesteps"] = list(recipe.scheduler.timesteps)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    results = {"dtype": str(dtype).removeprefix("torch.")}
    for name, batch in (("default", 1), (f"batch_{args.batch}", args.batch)):

        def call(pipe=pipe, batch=batch):
            pipe(
                prompt=PROMPT,
                num_inference_steps=variant.num_inference_steps,
                guidance_scale=variant.guidance_scale,
                width=side.get("width", variant.width),
                height=side.get("height", variant.height),
                num_images_per_prompt=batch,
                generator=torch.Generator("cpu").manual_seed(1),
                **extra,
            )

        runs = args.runs if batch == 1 else max(1, args.runs // 2)
        results[name] = summary(timed(call, args.warmup, runs, device), batch)
        print(f"  baseline {name:>10}: {results[name]['median_ms']:9.1f} ms median", flush=True)
        if args.quick or device == "cpu":
            break  # a batch of full-size images on a CPU takes minutes and says nothing new
    if "inpaint" in args.cases:
        # Stock inpainting over the same components, with the step count fastsd runs for the
        # default strength (0.8): int(steps x strength) of them denoise, as in fastsd.
        inpaint = diffusers.AutoPipelineForInpainting.from_pipe(pipe)
        width, height = side.get("width", variant.width), side.get("height", variant.height)
        image, mask = inpainting_inputs(width, height)
        steps = min(variant.max_steps, math.ceil(variant.num_inference_steps / 0.8 - 1e-9))

        def inpaint_call(pipe=inpaint):
            pipe(prompt=PROMPT, image=image, mask_image=mask, strength=0.8, num_inference_steps=steps,
                 guidance_scale=variant.guidance_scale, width=width, height=height,
                 generator=torch.Generator("cpu").manual_seed(1), **extra)  # fmt: skip

        results["inpaint"] = summary(timed(inpaint_call, args.warmup, args.runs, device))
        print(f"  baseline {'inpaint':>10}: {results['inpaint']['median_ms']:9.1f} ms median", flush=True)
        del inpaint
    if "controlnet" in args.cases:
        # Stock ControlNet text-to-image over the same components and ControlNet weights: the card's
        # code, with the edges found the way the cards find them (cv2.Canny 100/200).
        repo = root / "weights" / variant.controlnet_repo(variants.CANNY)
        controlnet = diffusers.ControlNetModel.from_pretrained(
            repo, torch_dtype=dtype, variant="fp16" if any(repo.glob("*.fp16.safetensors")) and fp16 else None
        ).to(device)
        guided = diffusers.AutoPipelineForText2Image.from_pipe(pipe, controlnet=controlnet)
        width, height = side.get("width", variant.width), side.get("height", variant.height)
        edges = images.canny_edges(drawing(width, height))

        def controlnet_call(pipe=guided):
            pipe(prompt=PROMPT, image=edges, num_inference_steps=variant.num_inference_steps,
                 guidance_scale=variant.guidance_scale, width=width, height=height,
                 controlnet_conditioning_scale=variants.CONDITIONING_SCALE[variant.architecture],
                 generator=torch.Generator("cpu").manual_seed(1), **extra)  # fmt: skip

        results["controlnet"] = summary(timed(controlnet_call, args.warmup, args.runs, device))
        print(f"  baseline {'controlnet':>10}: {results['controlnet']['median_ms']:9.1f} ms median", flush=True)
        del guided, controlnet
    del pipe
    release(device)
    return results


def bench_load(variant, root: Path, args, log_dir: Path, side: dict) -> dict:
    """K clients sending requests back to back, three ways in the same run on the same weights:
    the server as the image runs it (its slots, at least K, and batching); the same K clients on
    one slot, where requests run one at a time and a 409 is retried after 50 ms (a tighter loop
    steals the CPU from the model); and one client alone on one slot: the sequential reference."""
    results = {}

    def make_inputs(index: int) -> dict:
        # Prompts vary (the prompt cache must not make the batched run look better), seeds too.
        return dict(prompt=f"{PROMPT}, variation {index % 7}", seed=index, **side)

    for clients in args.load:
        requests = args.requests or 4 * clients
        modes = (
            ("batched", max(declared_concurrency(), clients), clients, requests),
            ("one slot", 1, clients, requests),
            ("sequential", 1, 1, max(2, requests // clients)),
        )
        for mode, slots, senders, count in modes:
            log_path = log_dir / f"server-{variant.name}-load-{clients}-{mode.replace(' ', '-')}.log"
            environment = {"FASTSD_VARIANT": variant.name, "FASTSD_WEIGHTS_ROOT": str(root)}
            server = CogServer({**environment, "COG_MAX_CONCURRENCY": str(slots)}, log_path)
            try:
                if server.wait_for_setup()["status"] != "READY":
                    raise RuntimeError(f"setup failed: {log_path.read_text()[-3000:]}")
                server.predict(**make_inputs(0))  # warm
                load = run_clients(server, senders, count, make_inputs, retry_after_s=0.05)
            finally:
                server.stop()
            summary = dict(load.summary(), slots=slots, clients=senders)
            results.setdefault(str(clients), {})[mode] = summary
            print(
                f"  {clients:>3} clients, {mode:>10} ({senders} client(s), {slots} slot(s)): "
                f"{summary['images_per_s']:8.3f} images/s, latency p50/p95/p99 {summary['latency_s']['p50']:.3f}/"
                f"{summary['latency_s']['p95']:.3f}/{summary['latency_s']['p99']:.3f} s, batch sizes "
                f"{summary['batch_sizes']}, 409s {summary['refused_409']}, failed {dict(summary['failed'])}",
                flush=True,
            )
        measured = results[str(clients)]
        for reference in ("one slot", "sequential"):
            ratio = round(measured["batched"]["images_per_s"] / measured[reference]["images_per_s"], 2)
            measured[f"batched_vs_{reference.replace(' ', '_')}"] = ratio
            print(f"  {clients:>3} clients: batched / {reference} = {ratio}x", flush=True)
    return results


def bench_encoding(args) -> dict:
    """Output encoders at 512 and 1024, on an image with natural-image statistics (1/f spectrum)."""
    import numpy as np
    from PIL import Image

    results = {}
    for side in (512, 1024):
        rng = np.random.default_rng(0)
        frequency = np.hypot(np.fft.fftfreq(side)[:, None], np.fft.fftfreq(side)[None, :])
        channels = []
        for _ in range(3):
            spectrum = np.exp(2j * np.pi * rng.random((side, side))) / np.maximum(frequency, 1 / side) ** 1.5
            channel = np.real(np.fft.ifft2(spectrum))
            channels.append((channel - channel.min()) / np.ptp(channel))
        image = Image.fromarray((np.stack(channels, -1) * 255).astype("uint8"))
        for output_format in ("webp", "jpg", "png"):
            encode = functools.partial(images.encode, image, output_format, 80)
            durations = timed(encode, 1, max(3, args.runs), "cpu")
            size_kib = len(images.encode(image, output_format, 80)) / 1024
            results[f"{output_format}_{side}"] = dict(summary(durations), kib=round(size_kib, 1))
    return results


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


def print_table(report: dict) -> None:
    print(f"\n{report['device']} | {report['dtype']} | {report['versions']}")
    print(f"{'variant':<16}{'case':<14}{'median ms':>11}{'min':>9}{'max':>9}{'img/s':>9}{'vs stock':>10}")
    for name, result in report["variants"].items():
        baseline = result.get("baseline", {})
        rows = [(case, r) for case, r in result["server"].items() if isinstance(r, dict)]
        rows += [(f"stock {case}", r) for case, r in baseline.items() if isinstance(r, dict) and "min_ms" in r]
        for case, r in rows:
            per_image = r["median_ms"] / r["inputs"].get("num_outputs", 1) if "inputs" in r else r["median_ms"]
            stock = baseline.get(case if case in baseline else "default", {}).get("median_ms", float("nan"))
            ratio = "" if case.startswith("stock") else f"{stock / per_image:.2f}x"
            print(
                f"{name:<16}{case:<14}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['max_ms']:>9.1f}"
                f"{r['images_per_s']:>9.2f}{ratio:>10}"
            )
        if "default" in result["server"]:
            print(
                f"{name:<16}server, input handling and output encoding over the bare pipeline call (default "
                f"inputs): {result['server']['default']['overhead_median_ms']:.1f} ms median"
            )
        if "setup_s" in result["server"]:
            print(f"{name:<16}server start to READY (load, compile, warm-up): {result['server']['setup_s']:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["sd-turbo"], choices=list(variants.VARIANTS))
    parser.add_argument("--quick", action="store_true", help="tiny models, few runs: a smoke run on a CPU")
    parser.add_argument("--runs", type=int, help="measured runs per case (default 5, --quick 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images per request in the batch case")
    parser.add_argument("--root", type=Path, help="where the random weights are built and kept")
    parser.add_argument("--json", type=Path, help="where to write the results (default: benchmarks/...)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-phases", action="store_true", help="no in-process phase timings")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="which server requests to time (batch: --batch images per request)",
    )
    parser.add_argument("--compile", help="FASTSD_COMPILE for fastsd's side (1, or a torch.compile mode)")
    parser.add_argument(
        "--load",
        type=int,
        nargs="+",
        metavar="CLIENTS",
        help="load mode: for each number of concurrent clients, throughput and latency batched against one slot",
    )
    parser.add_argument("--requests", type=int, help="load mode: requests per run (default 4 per client)")
    args = parser.parse_args()
    # A time limit (timeout sends SIGTERM) still runs the finally blocks that stop the Cog servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    if not 1 <= args.batch <= MAX_OUTPUTS:
        parser.error(f"--batch must be between 1 and {MAX_OUTPUTS}, the server's num_outputs limit")
    size = random_models.TINY if args.quick else random_models.FULL
    args.runs = args.runs or (10 if args.quick else 5)
    root = args.root or Path.home() / ".cache" / "fastsd-benchmark" / f"{size}-fp16"
    if args.compile:
        os.environ["FASTSD_COMPILE"] = args.compile  # for the server and the in-process engine alike
    os.environ["FASTSD_WEIGHTS_ROOT"] = str(root)  # the in-process engine loads the same weights as the server
    device, dtype = select_device()
    log_dir = Path(args.json).parent if args.json else Path("benchmarks")
    log_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": size,
        "compile": args.compile,
        "versions": versions(),
        "variants": {},
    }
    out = args.json or log_dir / f"results-{device}-{size}-{datetime.now():%Y%m%d-%H%M}.json"

    for name in args.variants:
        variant = variants.VARIANTS[name]
        if "controlnet" in args.cases:
            variant = variant.with_controlnets((variants.CANNY,))
        build_random_weights(variant, root, size, device)
        print(f"{name} on {report['device']} ({report['dtype']}, {size} weights)", flush=True)
        side = dict(width=64, height=64) if args.quick else {}
        if args.load:
            report["variants"][name] = {"load": bench_load(variant, root, args, log_dir, side)}
            out.write_text(json.dumps(report, indent=2))
            continue
        inpainting = inpainting_inputs(side.get("width", variant.width), side.get("height", variant.height))
        every_case = {
            "default": {**side},
            "vae_full": {"vae": "full", **side},
            "vae_tiny": {"vae": "tiny", **side},
            "batch": {"num_outputs": args.batch, "vae": "tiny", **side},
            "inpaint": dict(zip(("image", "mask"), map(png_data_uri, inpainting), strict=True), **side),
            "controlnet": dict(
                control_image=png_data_uri(
                    drawing(side.get("width", variant.width), side.get("height", variant.height))
                ),
                controlnet=variants.CANNY,
            ),
        }
        if device == "cpu" and not args.quick:
            every_case.pop("batch")  # minutes per request on a CPU, and no new information
        cases = {
            (f"batch_{args.batch}" if case == "batch" else case): inputs
            for case, inputs in every_case.items()
            if case in args.cases
        }
        result = report["variants"][name] = {"server": {}}
        try:
            bench_server(variant, root, cases, args, log_dir, result["server"])
            # The baseline before the in-process phases: a compiled engine left in this process
            # slowed the stock pipeline after it by a fifth on the 2-core CPU.
            result["baseline"] = (
                {"default": {"median_ms": float("nan")}}
                if args.skip_baseline
                else bench_baseline(variant, root, args, device, side)
            )
            if not args.skip_phases:
                result["phases"] = bench_phases(variant, args, device, side)
        except SystemExit:
            report["stopped"] = f"at the time limit, during {name}: the results hold what was measured before"
            out.write_text(json.dumps(report, indent=2))
            print(f"stopped at the time limit; partial results in {out}", flush=True)
            raise
        out.write_text(json.dumps(report, indent=2))
    if args.load:
        print(f"\nwrote {out}")
        return 0
    report["encoding"] = bench_encoding(args)

    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(
        "\noutput encoding (ms median, KiB):",
        ", ".join(f"{k} {v['median_ms']:.1f}/{v['kib']:.0f}" for k, v in report["encoding"].items()),
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
