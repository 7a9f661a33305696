"""The GPU fast path against the eager path, end to end through the Cog server, in one run.

    python scripts/graphs_benchmark.py --quick       # tiny models at 64x64 (on a CPU: the eager stand-in)
    python scripts/graphs_benchmark.py               # sd-turbo, sdxl-turbo, sdxl-lcm, sdxl-lightning, full size
    python scripts/graphs_benchmark.py --deadline 450 --json benchmarks/gpu-run/graphs.json

Random weights in the real layout (scripts/benchmark.py builds them once under --root). For each
variant, one server with FASTSD_GRAPHS=off and one with FASTSD_GRAPHS=on, then:
1. setup: server start to READY, every capture included;
2. parity: the same requests as PNG on both (text-to-image with each vae and a padded batch of 3,
   image-to-image, inpainting, ControlNet canny for the first variant): the largest difference of
   any pixel between graphed and eager, in levels of 255 (the fast path's promise: at most 1);
3. latency: the default request and a batch of --batch, median of --runs after warm-up, and what
   the server adds over the pipeline call;
4. load (the first variant): K clients sending back to back, images/s and latency percentiles.
Then the Cog floor (fastsd_testing/floor_predictor.py: a fixed JPEG, the same server and client),
the first variant in process (Engine.generate, graphed and eager), and stock diffusers for it.
The JSON is rewritten after every measurement; past --deadline seconds what is left is skipped and
named in the JSON, so a run stopped at a time limit still reports what it measured.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from fastsd import variants
from fastsd.engine import Engine
from fastsd.pipelines import select_device
from fastsd.settings import Settings
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
)
from fastsd_testing.cog_server import CogServer, declared_concurrency, output_pixels
from fastsd_testing.load import run_clients

FLOOR_PREDICTOR = "fastsd_testing/floor_predictor.py:FloorPredictor"
DEFAULT_VARIANTS = ("sd-turbo", "sdxl-turbo", "sdxl-lcm", "sdxl-lightning")


class OutOfTime(Exception):
    pass


class Run:
    """The report, written after every measurement, and the deadline."""

    def __init__(self, args, device: str, dtype):
        self.args, self.device = args, device
        self.deadline = time.monotonic() + args.deadline
        self.report = Report("graphs", args, device, dtype, variants={}, skipped=[])

    def write(self) -> None:
        self.report.write()

    def check(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            self.report["skipped"].append(what)
            self.write()
            raise OutOfTime(what)


def parity_cases(variant, side: dict, with_controlnet: bool) -> dict[str, dict]:
    width, height = side.get("width", variant.width), side.get("height", variant.height)
    image, mask = inpainting_inputs(width, height)
    other_vae = "full" if variant.default_vae == "tiny" else "tiny"
    cases = {
        "text_to_image": {},
        "text_to_image_3_padded": {"num_outputs": 3},
        f"text_to_image_vae_{other_vae}": {"vae": other_vae},
        "image_to_image": {"image": png_data_uri(image), "strength": 0.5},
        "inpainting": {"image": png_data_uri(image), "mask": png_data_uri(mask)},
    }
    if with_controlnet:
        cases["controlnet_canny"] = {"control_image": png_data_uri(drawing(width, height)), "controlnet": "canny"}
    return {name: dict(inputs, **side, output_format="png", seed=11, prompt=PROMPT) for name, inputs in cases.items()}


def serve(run: Run, variant, graphs: str, controlnet: bool, log_dir: Path) -> tuple[CogServer, float]:
    slots = max(declared_concurrency(), *(run.args.load or [1]))
    environment = {
        "FASTSD_VARIANT": variant.name,
        "FASTSD_WEIGHTS_ROOT": str(run.args.root),
        "FASTSD_GRAPHS": graphs,
        "COG_MAX_CONCURRENCY": str(slots),
        **({"FASTSD_CONTROLNETS": variants.CANNY} if controlnet else {}),
    }
    started = time.perf_counter()
    server = CogServer(environment, log_dir / f"server-{variant.name}-graphs-{graphs}.log")
    state = server.wait_for_setup()
    if state["status"] != "READY":
        server.stop()
        raise RuntimeError(f"setup failed: {server.log_path.read_text()[-3000:]}")
    return server, round(time.perf_counter() - started, 1)


def latency(server: CogServer, inputs: dict, args) -> dict:
    overheads = []

    def call():
        started = time.perf_counter()
        response = server.predict(**inputs)
        if response["status"] != "succeeded":
            raise RuntimeError(response.get("error"))
        overheads.append(time.perf_counter() - started - response["metrics"]["inference_time"])

    durations = timed(call, args.warmup, args.runs, "cpu")
    result = summary(durations, inputs.get("num_outputs", 1))
    result["server_overhead_median_ms"] = round(statistics.median(overheads[args.warmup :]) * 1000, 2)
    return result


def load(server: CogServer, clients: int, side: dict) -> dict:
    def make_inputs(index: int) -> dict:
        return dict(prompt=f"{PROMPT}, variation {index % 7}", seed=index, **side)

    server.predict(**make_inputs(0))
    measured = run_clients(server, clients, 4 * clients, make_inputs, retry_after_s=0.005).summary()
    return {key: measured[key] for key in ("images_per_s", "latency_s", "batch_sizes", "refused_409", "succeeded")}


def bench_variant(run: Run, name: str, first: bool, side: dict, log_dir: Path) -> None:
    args = run.args
    # The first variant gets every measurement; the others (SDXL, seconds a request at 1024) fewer
    # runs, so that the four fit the GPU run's minutes.
    fewer = SimpleNamespace(runs=args.runs if first else max(5, args.runs // 2), warmup=args.warmup)
    batch_runs = SimpleNamespace(runs=max(3, fewer.runs // 2), warmup=min(2, args.warmup))
    variant = variants.VARIANTS[name]
    if first:
        variant = variant.with_controlnets((variants.CANNY,))
    run.check(f"{name}: building weights")
    build_random_weights(variant, args.root, run.report["weights"], run.device)
    result = run.report["variants"][name] = {"parity_max_level_difference": {}}
    cases = parity_cases(variant, side, first)
    images = {}
    for graphs in ("off", "on"):
        run.check(f"{name}: graphs {graphs}")
        server, setup_s = serve(run, variant, graphs, first, log_dir)
        mine = result[f"graphs_{graphs}"] = {"setup_s": setup_s}
        print(f"{name} graphs {graphs}: setup {setup_s} s", flush=True)
        try:
            images[graphs] = {case: output_pixels(server.predict(**inputs)) for case, inputs in cases.items()}
            run.write()
            mine["default"] = latency(server, dict(prompt=PROMPT, seed=1, **side), fewer)
            print(f"  default: {mine['default']['median_ms']} ms median", flush=True)
            if first:  # jpg: nvJPEG on the device with graphs on (where torchvision has it), Pillow off
                jpg = dict(prompt=PROMPT, seed=1, output_format="jpg", **side)
                mine["default_jpg"] = latency(server, jpg, fewer)
                print(f"  default, jpg: {mine['default_jpg']['median_ms']} ms median", flush=True)
            run.write()
            run.check(f"{name}: graphs {graphs}: batch")
            batch = dict(prompt=PROMPT, seed=1, num_outputs=args.batch, **side)
            mine[f"batch_{args.batch}"] = latency(server, batch, batch_runs)
            print(f"  batch of {args.batch}: {mine[f'batch_{args.batch}']['images_per_s']} images/s", flush=True)
            run.write()
            for clients in args.load if first else ():
                run.check(f"{name}: graphs {graphs}: load {clients}")
                mine[f"load_{clients}_clients"] = measured = load(server, clients, side)
                print(f"  {clients} clients: {measured['images_per_s']} images/s, {measured['latency_s']}", flush=True)
                run.write()
        finally:
            server.stop()
    for case in cases:
        difference = max(int(np.abs(a - b).max()) for a, b in zip(images["on"][case], images["off"][case], strict=True))
        result["parity_max_level_difference"][case] = difference
    print(f"  parity (max level difference, graphed vs eager): {result['parity_max_level_difference']}", flush=True)
    run.write()


def bench_floor(run: Run, log_dir: Path) -> None:
    run.check("the Cog floor")
    slots = max(declared_concurrency(), *(run.args.load or [1]))
    environment = {"COG_PREDICT_TYPE_STUB": FLOOR_PREDICTOR, "COG_MAX_CONCURRENCY": str(slots)}
    server = CogServer(environment, log_dir / "server-floor.log")
    try:
        if server.wait_for_setup()["status"] != "READY":
            raise RuntimeError(f"the floor predictor failed setup: {server.log_path.read_text()[-3000:]}")
        floor = run.report["cog_floor"] = {"default": latency(server, dict(prompt=PROMPT, seed=1), run.args)}
        print(f"Cog floor: {floor['default']['median_ms']} ms median", flush=True)
        for clients in run.args.load:
            floor[f"load_{clients}_clients"] = load(server, clients, {})
            print(f"  {clients} clients: {floor[f'load_{clients}_clients']['images_per_s']} requests/s", flush=True)
        run.write()
    finally:
        server.stop()


def bench_in_process(run: Run, name: str, side: dict) -> None:
    """Engine.generate alone (prompt cached, no server, no encoding), graphed and eager."""
    run.check(f"{name}: in process")
    engine = Engine.load(variants.VARIANTS[name], Settings(weights_root=run.args.root, graphs=True))
    engine.warm_up()
    request = engine.validate(prompt=PROMPT, seed=1, **side)
    measured = run.report["variants"][name]["in_process"] = {}
    for mode, paused in (("graphed", False), ("eager", True)):
        engine.graphs.paused = paused
        measured[mode] = summary(timed(lambda: engine.generate_batch([request]), run.args.warmup, run.args.runs,
                                       run.device))  # fmt: skip
        print(f"{name} in process, {mode}: {measured[mode]['median_ms']} ms median", flush=True)
    measured["graphs"] = engine.graphs.summary()
    run.write()
    engine = None
    release(run.device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, runs=20, quick_runs=5, several=True)
    parser.set_defaults(variants=list(DEFAULT_VARIANTS), warmup=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--load", type=int, nargs="*", default=[8, 32], metavar="CLIENTS")
    parser.add_argument("--deadline", type=float, default=450, help="seconds; what is left after it is skipped")
    parser.add_argument("--log-dir", type=Path, help="the servers' logs (default: beside the JSON)")
    args = resolve_options(parser.parse_args())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time limit still stops the servers
    device, dtype = select_device()
    side = dict(width=64, height=64) if args.quick else {}
    run = Run(args, device, dtype)
    log_dir = args.log_dir or run.report.path.parent
    log_dir.mkdir(parents=True, exist_ok=True)
    first = args.variants[0]
    try:
        bench_variant(run, first, True, side, log_dir)
        bench_floor(run, log_dir)
        bench_in_process(run, first, side)
        run.check(f"{first}: stock diffusers")
        baseline_args = SimpleNamespace(
            runs=args.runs, warmup=args.warmup, quick=args.quick, batch=args.batch, cases=[]
        )
        run.report["variants"][first]["stock_diffusers"] = bench_baseline(
            variants.VARIANTS[first], args.root, baseline_args, device, side
        )
        run.write()
        for name in args.variants[1:]:
            bench_variant(run, name, False, side, log_dir)
    except OutOfTime as stopped:
        print(f"out of time at {stopped}: the JSON holds what was measured before", flush=True)
    except SystemExit:
        run.report["skipped"].append("stopped at the time limit (SIGTERM)")
        run.write()
        raise
    synchronize(device)
    run.write()
    print(f"wrote {run.report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
