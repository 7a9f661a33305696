#!/usr/bin/env python
"""A soak: thousands of predictions with mixed inputs through the Cog server, several clients at
once, and what they leave behind.

    python scripts/soak.py                          # 2,000 predictions, 4 clients, tiny sd-turbo
    python scripts/soak.py --requests 500 --clients 8 --variant sdxl-turbo

Mixed inputs: sizes, batches, formats, image-to-image from data URIs, and bad inputs among them.
Prints the worker's memory (RSS) and open files after a warm-up and at the end, the temporary
files left, and the failures: an expected failure is a bad input refused with a message; anything
else is unexpected. Exits 1 when memory grows by 5% or more, files or temporary files pile up, or
anything unexpected happens.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

from fastsd import variants
from fastsd_testing import random_models
from fastsd_testing.cog_server import CogServer
from fastsd_testing.load import run_clients

SIDES = (64, 96, 128)
FORMATS = ("webp", "png", "jpg")
BAD = (
    dict(seed=-1),
    dict(width=63),
    dict(num_outputs=9),
    dict(output_format="gif"),
    dict(prompt=""),
    dict(image="data:image/png;base64," + base64.b64encode(b"not an image").decode()),
)


def data_uri(index: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (80 + index % 3 * 8, 72), (index % 255, 90, 160)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_inputs(index: int) -> dict:
    """Request index: every 10th a bad one, every 4th image-to-image, the rest text-to-image."""
    side = SIDES[index % len(SIDES)]
    inputs = dict(prompt=f"soak {index % 13}", seed=index, width=side, height=side,
                  num_outputs=1 + index % 3, output_format=FORMATS[index % len(FORMATS)])  # fmt: skip
    if index % 10 == 9:
        return {**inputs, **BAD[index // 10 % len(BAD)], "bad": True}
    if index % 4 == 3:
        return {**inputs, "image": data_uri(index), "strength": 0.5}
    return inputs


def worker_state(server: CogServer) -> dict:
    """RSS and open files of the worker process (the server's child that holds the model)."""
    import psutil

    worker = max(psutil.Process(server.process.pid).children(recursive=True), key=lambda p: p.memory_info().rss)
    return {"rss_mib": round(worker.memory_info().rss / 2**20, 1), "open_files": worker.num_fds()}


def temporary_files() -> set[str]:
    root = Path(tempfile.gettempdir())
    return {str(path) for path in root.rglob("*") if path.is_file() and os.access(path, os.R_OK)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd-turbo", choices=list(variants.VARIANTS))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "fastsd-benchmark" / "tiny-fp16")
    args = parser.parse_args()
    random_models.build_variant(variants.VARIANTS[args.variant], args.root)
    log_path = Path(tempfile.mkdtemp(prefix="fastsd-soak-")) / "server.log"
    server = CogServer({"FASTSD_VARIANT": args.variant, "FASTSD_WEIGHTS_ROOT": str(args.root)}, log_path)
    try:
        if server.wait_for_setup()["status"] != "READY":
            print(log_path.read_text()[-3000:], file=sys.stderr)
            return 1

        def send(index: int) -> dict:
            return {k: v for k, v in make_inputs(index).items() if k != "bad"}

        # A warm-up over every kind of request, so that caches and pools have their size.
        run_clients(server, args.clients, 120, send)
        before, files_before = worker_state(server), temporary_files()
        load = run_clients(server, args.clients, args.requests, send)
        after, files_after = worker_state(server), temporary_files()
    finally:
        server.stop()

    unexpected = []
    for outcome in load.outcomes:
        bad = make_inputs(outcome.index).get("bad", False)
        if bad and not (outcome.status == "failed" and outcome.error):
            unexpected.append((outcome.index, "a bad input was not refused", outcome.status))
        elif not bad and outcome.status != "succeeded":
            unexpected.append((outcome.index, outcome.status, (outcome.error or "")[:200]))
    new_files = sorted(files_after - files_before)
    # The server keeps the last 64 requests' output folders on purpose (Cog reads them after run()).
    outputs = {Path(name).parent for name in new_files if "/fastsd-outputs-" in name}
    left = [name for name in new_files if "/fastsd-outputs-" not in name]
    growth = (after["rss_mib"] - before["rss_mib"]) / before["rss_mib"]
    summary = load.summary()
    print(f"{args.requests} predictions, {args.clients} clients, {args.variant} (tiny weights): "
          f"{summary['images_per_s']} images/s, {summary['wall_s']} s")  # fmt: skip
    print(f"worker memory: {before['rss_mib']} MiB after the warm-up, {after['rss_mib']} MiB at the end "
          f"({growth:+.1%}); open files {before['open_files']} -> {after['open_files']}")  # fmt: skip
    print(f"output folders kept: {len(outputs)} (bounded at 64); other temporary files left: {len(left)}"
          + (f" (first: {left[:5]})" if left else ""))  # fmt: skip
    expected = sum(1 for o in load.outcomes if make_inputs(o.index).get("bad"))
    print(f"refused (409), then retried: {load.refused}; expected failures (bad inputs): {expected}; "
          f"unexpected: {len(unexpected)}")  # fmt: skip
    for item in unexpected[:10]:
        print("  unexpected:", item)
    healthy = growth < 0.05 and after["open_files"] <= before["open_files"] + 2 and not unexpected
    healthy = healthy and len(outputs) <= 64 and not left
    print("ok" if healthy else "NOT OK")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
