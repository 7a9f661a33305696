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
import math
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

from fastsd import images, variants
from fastsd.engine import Engine
from fastsd.inputs import MAX_OUTPUTS
from fastsd.pipelines import select_device
from fastsd.settings import Settings
from fastsd.tasks import Task
from fastsd_testing.bench import (
    PROMPT,
    Report,
    add_options,
    bench_baseline,
    build_random_weights,
    drawing,
    inpainting_inputs,
    png_data_uri,
    release,
    resolve_options,
    summary,
    synchronize,
    timed,
    too_large_here,
    worker_peak_rss_mib,
)
from fastsd_testing.cog_server import CogServer, declared_concurrency, decode_output
from fastsd_testing.load import run_clients

CASES = ("default", "vae_full", "vae_tiny", "batch", "inpaint", "controlnet")


def tier_name(args) -> str:
    """The run's fastsd settings in a word: eager, or the tiers it turns on."""
    parts = [f"compile-{args.compile}" if args.compile else "", f"attention-{args.attention}" if args.attention else "",
             "fp8" if args.fp8 else ""]  # fmt: skip
    return "-".join(part for part in parts if part) or "eager"


def bench_server(variant, root: Path, cases: dict, args, log_dir: Path, results: dict) -> None:
    """Fills results as it goes, so a run stopped at a time limit still reports what it measured."""
    started = time.perf_counter()
    log_name = f"server-{variant.name}-{tier_name(args)}.log"
    environment = {"FASTSD_VARIANT": variant.name, "FASTSD_WEIGHTS_ROOT": str(root)}
    environment |= {"FASTSD_CONTROLNETS": ",".join(variant.controlnets), "FASTSD_COMPILE": args.compile or "",
                    "FASTSD_ATTENTION": args.attention or "", "FASTSD_FP8": "on" if args.fp8 else "off"}  # fmt: skip
    server = CogServer(environment, log_dir / log_name)
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
    tier = dict(compile=args.compile, attention=args.attention, fp8=args.fp8)
    engine = Engine.load(variant, Settings(weights_root=args.root, **tier))
    engine.warm_up()
    results = {"dtype": str(engine.pipelines.dtype).removeprefix("torch.")}
    for vae in engine.pipelines.vae_choices:
        pipeline = engine.pipelines.get(Task.TEXT_TO_IMAGE, vae)
        samples: dict[str, list[float]] = {}
        for run in range(args.warmup + args.runs):
            # A fresh cache: the text encoders are measured every time.
            engine.prompts = type(engine.prompts)(engine.family.prompts(pipeline, device, variant))
            timer = PhaseTimer(device)
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipeline, name, None) is not None:
                    timer.watch("prompt_encoding", getattr(pipeline, name))
            timer.watch("denoising", getattr(pipeline, engine.family.denoiser))
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
            ratio = "" if case.startswith("stock") or math.isnan(stock) else f"{stock / per_image:.2f}x"
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
    add_options(parser, runs=5, quick_runs=10, several=True)
    parser.add_argument("--batch", type=int, default=8, help="images per request in the batch case")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-phases", action="store_true", help="no in-process phase timings")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="which server requests to time (batch: --batch images per request)",
    )
    parser.add_argument("--compile", help="FASTSD_COMPILE for fastsd's side (on, regional, or a torch.compile mode)")
    parser.add_argument("--attention", help="FASTSD_ATTENTION for fastsd's side (the transformers: _native_cudnn, ...)")
    parser.add_argument("--fp8", action="store_true", help="FASTSD_FP8=on for fastsd's side (the transformers)")
    parser.add_argument(
        "--load",
        type=int,
        nargs="+",
        metavar="CLIENTS",
        help="load mode: for each number of concurrent clients, throughput and latency batched against one slot",
    )
    parser.add_argument("--requests", type=int, help="load mode: requests per run (default 4 per client)")
    args = resolve_options(parser.parse_args())
    # A time limit (timeout sends SIGTERM) still runs the finally blocks that stop the Cog servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    if not 1 <= args.batch <= MAX_OUTPUTS:
        parser.error(f"--batch must be between 1 and {MAX_OUTPUTS}, the server's num_outputs limit")
    if args.compile:
        args.compile = Settings.from_environment({"FASTSD_COMPILE": args.compile}).compile  # checked as the server will
    device, dtype = select_device()
    report = Report("fastsd", args, device, dtype, compile=args.compile, attention=args.attention, fp8=args.fp8,
                    tier=tier_name(args), variants={})  # fmt: skip
    log_dir = report.path.parent

    for name in args.variants:
        variant = variants.VARIANTS[name]
        if "controlnet" in args.cases and variants.CANNY in variant.controlnet_choices():
            variant = variant.with_controlnets((variants.CANNY,))
        reason = too_large_here(variant, args.size, device)
        if reason:
            print(reason, flush=True)
            report["variants"][name] = {"not_measured": reason}
            continue
        build_random_weights(variant, args.root, args.size, device)
        print(f"{name} on {report['device']} ({report['dtype']}, {args.size} weights)", flush=True)
        side = dict(width=64, height=64) if args.quick else {}
        if args.load:
            report["variants"][name] = {"load": bench_load(variant, args.root, args, log_dir, side)}
            report.write()
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
            if case in args.cases and (case != "controlnet" or variant.controlnets)
        }
        result = report["variants"][name] = {"server": {}}
        try:
            bench_server(variant, args.root, cases, args, log_dir, result["server"])
            # The baseline before the in-process phases: a compiled engine left in this process
            # slowed the stock pipeline after it by a fifth on the 2-core CPU.
            result["baseline"] = (
                {"default": {"median_ms": float("nan")}}
                if args.skip_baseline
                else bench_baseline(variant, args.root, args, device, side)
            )
            if not args.skip_phases:
                result["phases"] = bench_phases(variant, args, device, side)
        except SystemExit:
            report["stopped"] = f"at the time limit, during {name}: the results hold what was measured before"
            print(f"stopped at the time limit; partial results in {report.write()}", flush=True)
            raise
        report.write()
    if args.load:
        print(f"\nwrote {report.write()}")
        return 0
    report["encoding"] = bench_encoding(args)
    report.write()
    print_table(report.data)
    print(
        "\noutput encoding (ms median, KiB):",
        ", ".join(f"{k} {v['median_ms']:.1f}/{v['kib']:.0f}" for k, v in report["encoding"].items()),
    )
    print(f"\nwrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
