#!/usr/bin/env python
"""Frames per second and latency per frame through the realtime server, for 1 and 4 clients, and
what the protocol costs above the engine's own time.

    python scripts/realtime_benchmark.py --quick                  # the tiny random sd-turbo, 64x64
    python scripts/realtime_benchmark.py                          # full-size random weights, 512x512
    python scripts/realtime_benchmark.py --real                   # the variant's weights under weights/

Each client holds one websocket, sends a new frame (image-to-image) the moment the previous image
arrives, and times the round trip. The same run measures the baseline: the same frames straight
through the engine (validate, generate, encode) with no server. The protocol's cost per frame is
the round trip minus the engine's own time for that frame (preparing the frame, the pipeline call,
the safety check, encoding: the server reports them with each result), so the engine's variance
does not hide it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import websockets
from PIL import Image

from fastsd import images, variants
from fastsd.batching import Batcher
from fastsd.engine import Engine
from fastsd.pipelines import select_device
from fastsd.realtime.app import create_app
from fastsd.realtime.backend import EngineBackend, Passes
from fastsd.realtime.settings import Limits
from fastsd.settings import Settings
from fastsd_testing.bench import Report, add_options, build_random_weights, resolve_options
from fastsd_testing.realtime_server import serving

ENGINE_PARTS = ("prepare_ms", "inference_ms", "safety_ms", "encode_ms")


def frames(count: int, size: int) -> list[bytes]:
    """Distinct JPEG frames (random noise: none is skipped as a duplicate)."""
    generator = np.random.default_rng(0)
    made = []
    for _ in range(count):
        pixels = generator.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        made.append(buffer.getvalue())
    return made


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def baseline(engine: Engine, sent: list[bytes], params: dict) -> list[float]:
    """Milliseconds per frame straight through the engine: what the server's backend does, minus the server."""
    seconds = []
    for frame in sent:
        started = time.perf_counter()
        request = engine.validate(**params, image=frame)  # a frame is validated as its bytes, as the server does
        result = engine.generate_batch([request])[0]
        images.encode(result.images[0], "jpg", 80)
        seconds.append((time.perf_counter() - started) * 1000)
    return seconds


async def client(url: str, sent: list[bytes], params: dict) -> list[dict]:
    """One websocket, one frame in flight: each result's round trip and its server-side timings."""
    measured = []
    async with websockets.connect(url, max_size=None) as socket:
        assert json.loads(await socket.recv())["type"] == "ready"
        await socket.send(json.dumps({"type": "params", **params}))
        while json.loads(await socket.recv())["type"] != "result":  # the text-to-image answer to the params
            pass
        await socket.recv()
        for frame in sent:
            started = time.perf_counter()
            await socket.send(frame)
            while (message := json.loads(await socket.recv()))["type"] != "result":
                if message["type"] == "error":
                    raise RuntimeError(message["message"])
            await socket.recv()  # the image
            message["round_trip_ms"] = (time.perf_counter() - started) * 1000
            measured.append(message)
    return measured


async def run_clients(url: str, count: int, sent: list[bytes], params: dict) -> tuple[list[dict], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(client(url, sent, params) for _ in range(count)))
    return [r for one in results for r in one], time.perf_counter() - started


def summarized(measured: list[dict], seconds: float) -> dict:
    trips = [m["round_trip_ms"] for m in measured]
    waits = [m["queue_ms"] for m in measured]  # for the worker: other clients' calls (and a thread's wake-up)
    overhead = [m["round_trip_ms"] - m["queue_ms"] - sum(m[part] for part in ENGINE_PARTS) for m in measured]
    return {
        "fps": round(len(measured) / seconds, 1),
        "latency_p50_ms": round(percentile(trips, 0.5), 1),
        "latency_p95_ms": round(percentile(trips, 0.95), 1),
        "mean_batch": round(statistics.mean(m["batch_size"] for m in measured), 2),
        "queue_p50_ms": round(percentile(waits, 0.5), 2),
        "protocol_p50_ms": round(percentile(overhead, 0.5), 2),
        "protocol_p95_ms": round(percentile(overhead, 0.95), 2),
    }


def show(label: str, figures: dict) -> None:
    print(
        f"{label:<10} {figures['fps']:7.1f} fps   latency p50 {figures['latency_p50_ms']:7.1f} ms  "
        f"p95 {figures['latency_p95_ms']:7.1f} ms   mean batch {figures['mean_batch']:.1f}   "
        f"queue p50 {figures['queue_p50_ms']:6.2f} ms   protocol above the engine: "
        f"p50 {figures['protocol_p50_ms']:5.2f} ms  p95 {figures['protocol_p95_ms']:5.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, runs=30, quick_runs=30)  # runs: frames per client
    parser.add_argument("--real", action="store_true", help="the variant's real weights under weights/")
    parser.add_argument("--side", type=int, default=None, help="frame and image side (default 64 --quick, else 512)")
    parser.add_argument("--strength", type=float, default=0.5)
    args = resolve_options(parser.parse_args())
    side = args.side or (64 if args.quick else 512)
    variant = variants.VARIANTS[args.variant]
    # The environment's settings (FASTSD_FP8, FASTSD_ATTENTION, FASTSD_COMPILE: the tier measured), on the
    # random weights under --root unless --real.
    settings = Settings.from_environment() if args.real else Settings.from_environment(weights_root=args.root)
    if not args.real:
        build_random_weights(variant, args.root, args.size, select_device()[0])
    engine = Engine.load(variant, settings)
    engine.warm_up()
    params = dict(prompt="a watercolour of a harbour", width=side, height=side, strength=args.strength, seed=5)
    # The baseline runs what the page's fast pass runs for a changing frame: its steps and autoencoder.
    fast_pass = Passes.for_variant(variant, engine.pipelines.vae_choices).arguments(params, True, refined=False)
    sent = frames(args.runs, side)
    weights = "real" if args.real else f"{args.size} random"
    report = Report(f"realtime-{variant.name}", args, engine.pipelines.device, engine.pipelines.dtype,
                    variant=variant.name, side=side, strength=args.strength, frames_per_client=args.runs,
                    fast_pass=fast_pass)  # fmt: skip
    print(f"{variant.name} ({weights} weights) on {engine.pipelines.device}, {side}x{side} image-to-image at "
          f"strength {args.strength} (the fast pass: num_inference_steps {fast_pass['num_inference_steps']}, vae "
          f"{fast_pass['vae']}), "
          f"{args.runs} frames per client, {os.cpu_count()} CPU cores")  # fmt: skip
    # In a thread of its own, as the server's batcher runs the engine (on this loaded 2-core CPU, torch
    # in the main thread measured many times slower than in any other thread).
    with ThreadPoolExecutor(1) as worker:
        worker.submit(baseline, engine, sent[:3], fast_pass).result()  # image-to-image's first calls: not timed
        direct = worker.submit(baseline, engine, sent, fast_pass).result()
    engine_p50, engine_p95 = round(percentile(direct, 0.5), 1), round(percentile(direct, 0.95), 1)
    fps = round(1000 / statistics.mean(direct), 1)
    report["engine"] = {"fps": fps, "latency_p50_ms": engine_p50, "latency_p95_ms": engine_p95}
    print(f"{'engine':<10} {fps:7.1f} fps   latency p50 {engine_p50:7.1f} ms  p95 {engine_p95:7.1f} ms   "
          "(no server: the baseline)")  # fmt: skip
    app = create_app(EngineBackend(engine, Batcher(engine)), Limits(max_messages_per_second=10_000))
    with serving(app) as base:
        url = base.replace("http", "ws") + "/ws"
        for count in (1, 4):
            measured, seconds = asyncio.run(run_clients(url, count, sent, params))
            label = f"{count} client{'s' if count > 1 else ''}"
            report[label.replace(" ", "_")] = summarized(measured, seconds)
            show(label, report[label.replace(" ", "_")])
    print(f"wrote {report.write()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
