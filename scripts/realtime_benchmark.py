#!/usr/bin/env python
"""Frames per second and latency per frame through the realtime server, for 1 and 4 clients, and
what the protocol costs above the engine's own time.

    python scripts/realtime_benchmark.py                          # the tiny random sd-turbo, 64x64
    python scripts/realtime_benchmark.py --real --size 512        # the sd-turbo weights under weights/

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
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import websockets
from PIL import Image

from fastsd import images, variants
from fastsd.batching import Batcher
from fastsd.engine import Engine
from fastsd.realtime.app import create_app
from fastsd.realtime.backend import EngineBackend
from fastsd.realtime.settings import Limits
from fastsd_testing import random_models
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
    with tempfile.TemporaryDirectory() as folder:
        for number, frame in enumerate(sent):
            started = time.perf_counter()
            path = Path(folder) / f"{number}.jpg"
            path.write_bytes(frame)
            request = engine.validate(**params, image=path)
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


def report(label: str, measured: list[dict], seconds: float) -> None:
    trips = [m["round_trip_ms"] for m in measured]
    waits = [m["queue_ms"] for m in measured]  # for the worker: other clients' calls (and a thread's wake-up)
    overhead = [m["round_trip_ms"] - m["queue_ms"] - sum(m[part] for part in ENGINE_PARTS) for m in measured]
    batch = statistics.mean(m["batch_size"] for m in measured)
    print(
        f"{label:<10} {len(measured) / seconds:7.1f} fps   latency p50 {percentile(trips, 0.5):7.1f} ms  "
        f"p95 {percentile(trips, 0.95):7.1f} ms   mean batch {batch:.1f}   "
        f"queue p50 {percentile(waits, 0.5):6.2f} ms   "
        f"protocol above the engine: p50 {percentile(overhead, 0.5):5.2f} ms  p95 {percentile(overhead, 0.95):5.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--real", action="store_true", help="the variant's real weights under weights/ (else tiny random ones)"
    )
    parser.add_argument("--variant", default="sd-turbo")
    parser.add_argument("--size", type=int, default=None, help="frame and image side (default 64 tiny, 512 real)")
    parser.add_argument("--frames", type=int, default=30, help="frames per client and run (default 30)")
    parser.add_argument("--strength", type=float, default=0.5)
    args = parser.parse_args()
    size = args.size or (512 if args.real else 64)
    variant = variants.VARIANTS[args.variant]
    if not args.real:
        root = Path(tempfile.mkdtemp(prefix="fastsd-realtime-benchmark-"))
        random_models.build_variant(variant, root)
        os.environ["FASTSD_WEIGHTS_ROOT"] = str(root)
    engine = Engine.load(variant)
    engine.warm_up()
    params = dict(prompt="a watercolour of a harbour", width=size, height=size, strength=args.strength, seed=5)
    sent = frames(args.frames, size)
    print(f"{variant.name} ({'real' if args.real else 'tiny random'} weights) on {engine.pipelines.device}, "
          f"{size}x{size} image-to-image at strength {args.strength}, {args.frames} frames per client, "
          f"{os.cpu_count()} CPU cores")  # fmt: skip
    # In a thread of its own, as the server's batcher runs the engine (on this loaded 2-core CPU, torch
    # in the main thread measured many times slower than in any other thread).
    with ThreadPoolExecutor(1) as worker:
        worker.submit(baseline, engine, sent[:3], params).result()  # image-to-image's first calls: not timed
        direct = worker.submit(baseline, engine, sent, params).result()
    print(f"{'engine':<10} {1000 / statistics.mean(direct):7.1f} fps   latency p50 {percentile(direct, 0.5):7.1f} ms  "
          f"p95 {percentile(direct, 0.95):7.1f} ms   (no server: the baseline)")  # fmt: skip
    app = create_app(EngineBackend(engine, Batcher(engine)), Limits(max_messages_per_second=10_000))
    with serving(app) as base:
        url = base.replace("http", "ws") + "/ws"
        for count in (1, 4):
            measured, seconds = asyncio.run(run_clients(url, count, sent, params))
            report(f"{count} client{'s' if count > 1 else ''}", measured, seconds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
