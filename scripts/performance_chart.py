"""A PNG chart of a GPU benchmark's JSON, for docs/performance.md.

    python scripts/performance_chart.py benchmarks/gpu-h200-2026-11-27.json docs/images/gpu-h200-2026-11-27.png

Reads either benchmark's JSON: scripts/benchmark.py's (fastsd eager, and stock diffusers) or
scripts/graphs_benchmark.py's (FASTSD_GRAPHS off and on, stock diffusers where measured). Left:
one default request per variant, end to end through the Cog server (log scale), with the targets
of the GPU fast path; right: images/s with a batch of 8 per request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# The GPU fast path's targets (H200/H100, fp16, through the Cog server): docs/performance.md.
TARGET_MS = {"sd-turbo": 15, "sdxl-turbo": 30, "sdxl-lcm": 200}
TARGET_IMAGES_PER_S = {"sd-turbo": 400}


def series(report: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{series name: {variant: {"default_ms": ..., "batch_images_per_s": ...}}} from either format."""
    found: dict[str, dict[str, dict[str, float]]] = {}

    def add(name: str, variant: str, default: dict | None, batch: dict | None) -> None:
        values = {}
        if default and "median_ms" in default:
            values["default_ms"] = default["median_ms"]
        if batch and "images_per_s" in batch:
            values["batch_images_per_s"] = batch["images_per_s"]
        if values:
            found.setdefault(name, {})[variant] = values

    for variant, result in report["variants"].items():
        stock = result.get("baseline") or result.get("stock_diffusers") or {}
        add("stock diffusers", variant, stock.get("default"), stock.get("batch_8"))
        if "server" in result:
            add("fastsd (eager)", variant, result["server"].get("default"), result["server"].get("batch_8"))
        for graphs, label in (("graphs_off", "fastsd, graphs off"), ("graphs_on", "fastsd, graphs on")):
            if graphs in result:
                add(label, variant, result[graphs].get("default"), result[graphs].get("batch_8"))
    return found


def chart(report: dict, out: Path) -> None:
    found = series(report)
    variants = list(report["variants"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    width = 0.8 / max(1, len(found))
    for axis, key in ((left, "default_ms"), (right, "batch_images_per_s")):
        for index, (name, by_variant) in enumerate(found.items()):
            measured = [(i, by_variant[v][key]) for i, v in enumerate(variants) if key in by_variant.get(v, {})]
            if not measured:
                continue
            offset = (index - (len(found) - 1) / 2) * width
            xs, ys = [i + offset for i, _ in measured], [value for _, value in measured]
            bars = axis.bar(xs, ys, width, label=name)
            axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        targets = TARGET_MS if key == "default_ms" else TARGET_IMAGES_PER_S
        marked = [(i, targets[v]) for i, v in enumerate(variants) if v in targets]
        if marked:
            axis.scatter(*zip(*marked, strict=True), marker="_", s=900, color="black", zorder=3, label="target")
        axis.set_xticks(range(len(variants)), variants)
        axis.grid(axis="y", alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("ms per default request (log scale; lower is better)")
    right.set_ylabel("images/s, 8 images per request (higher is better)")
    left.legend(fontsize=8)
    versions = report.get("versions", {})
    figure.suptitle(
        f"{report['device']}, {report['dtype']}, through the Cog server, median per request "
        f"(torch {versions.get('torch')}, diffusers {versions.get('diffusers')}, {report['date'][:10]})",
        fontsize=10,
    )
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, metadata={"Software": None})  # no matplotlib version stamp: the same JSON, the same file
    print(f"wrote {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", type=Path, help="a benchmark JSON (benchmarks/gpu-*.json)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    args = parser.parse_args()
    chart(json.loads(args.benchmark.read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
