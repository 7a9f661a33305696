#!/usr/bin/env python
"""How close setup() comes to the time it takes just to read the weights, on this machine's CPU.

    python scripts/measure_cold_boot.py [--variant sd-turbo] [--root /tmp/fastsd-coldboot] [--runs 3]

Builds the variant's repos with full-size random weights in the real hub layout (once, cached
under --root), then, for each layout and run, from a cold page cache (posix_fadvise DONTNEED on
every file the loader reads; reported when the kernel cannot do it):
  read   reading every byte of the files the loader reads, nothing else;
  setup  a fresh process doing what Predictor.setup() does: ensure_weights + Engine.load, with
         each phase timed (from_pretrained, LoRA fuse, scheduler, .to(device), img2img pipe).
Imports (torch, diffusers, transformers) are timed apart: they are the same for any weights.

Layouts: "full" is what random_models writes (fp32 and fp16 files; the CPU, in fp32 or bf16, loads the
fp32 ones); "fp16" is what download_weights.py fetches (fp16 files only; the CPU loads them and
casts them to its dtype).
Prints the medians and the ratio setup/read; --profile adds a cProfile of one setup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _loaded_files(variant, root: Path) -> list[Path]:
    """The files Engine.load reads on this machine, with the precision pipelines.py chooses."""
    from fastsd import pipelines
    from fastsd.weights import layout

    _, dtype = pipelines.select_device()
    files = []
    for source in layout.sources(variant):
        folder = source.folder(root)
        if not folder.is_dir():
            continue
        if source.filename:
            files.append(folder / source.filename)
        elif source.role == layout.MODEL:
            chosen = pipelines.weights_variant(folder, dtype, source.skip)
            for component in pipelines._component_folders(folder, source.skip):
                candidates = sorted(component.glob("*.safetensors"))
                fp16 = [f for f in candidates if f.name.endswith(".fp16.safetensors")]
                files += fp16 if chosen == "fp16" else [f for f in candidates if f not in fp16]
                files += sorted(component.glob("*.json")) + sorted(component.glob("*.txt"))
            files.append(folder / "model_index.json")
        else:
            files += sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".fp16.safetensors"))
    return files


def drop_cache(files: list[Path]) -> bool:
    """Ask the kernel to forget the files' cached pages; False where it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_all(files: list[Path]) -> tuple[float, int]:
    buffer = bytearray(8 * 1024 * 1024)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as stream:
            # Sequential hint: the kernel reads ahead further (here 2 GB/s instead of 0.5): the
            # honest floor is the fastest plain read, not the default one.
            os.posix_fadvise(stream.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while count := stream.readinto(view):
                total += count
    return time.perf_counter() - started, total


def child(variant_name: str, root: Path, profile: bool) -> dict:
    """One setup() in this (fresh) process, phase by phase."""
    phases: dict[str, float] = {}
    started = time.perf_counter()
    import torch  # noqa: F401  (predict.py imports it before setup)

    phases["import torch"] = time.perf_counter() - started
    mark = time.perf_counter()
    import diffusers
    import transformers  # noqa: F401

    from fastsd import engine, pipelines, variants
    from fastsd.settings import Settings
    from fastsd.weights import provision

    phases["import diffusers+transformers"] = time.perf_counter() - mark

    depth: dict[str, int] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            depth[name] = depth.get(name, 0) + 1  # a nested call (the VAE inside the pipeline) counts once
            begun = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[name] -= 1
                if not depth[name]:
                    phases[name] = phases.get(name, 0.0) + time.perf_counter() - begun

        return wrapper

    # Time the phases of pipelines.load from outside (it looks these up at call time).
    pipeline_from_pretrained = diffusers.DiffusionPipeline.from_pretrained.__func__
    diffusers.DiffusionPipeline.from_pretrained = classmethod(timed("from_pretrained", pipeline_from_pretrained))
    vae_from_pretrained = diffusers.AutoencoderKL.from_pretrained.__func__
    diffusers.AutoencoderKL.from_pretrained = classmethod(timed("from_pretrained", vae_from_pretrained))
    pipelines._fuse_loras = timed("LoRA load+fuse", pipelines._fuse_loras)
    pipelines._set_scheduler = timed("scheduler", pipelines._set_scheduler)
    diffusers.DiffusionPipeline.to = timed(".to(device)", diffusers.DiffusionPipeline.to)
    from_pipe = diffusers.AutoPipelineForImage2Image.from_pipe.__func__
    diffusers.AutoPipelineForImage2Image.from_pipe = classmethod(timed("img2img from_pipe", from_pipe))

    variant = variants.get_variant(variant_name)
    mark = time.perf_counter()
    settings = Settings(weights_root=root)
    provision.ensure_weights(variant, settings)
    phases["ensure_weights"] = time.perf_counter() - mark
    mark = time.perf_counter()
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    loaded = engine.Engine.load(variant, settings)
    phases["Engine.load"] = time.perf_counter() - mark
    if profile:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    phases["setup (ensure_weights + Engine.load)"] = phases["ensure_weights"] + phases["Engine.load"]
    # safetensors are memory-mapped: on the CPU a weight left in fp32 is read from disk at its
    # first use (the first request), not in setup. Touch every weight once, then again, to tell
    # that page-in apart from the arithmetic.
    modules = [m for m in loaded.pipelines.text_to_image.components.values() if isinstance(m, torch.nn.Module)]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    for name in ("first use of every weight", "same again (compute only)"):
        mark = time.perf_counter()
        with torch.no_grad():
            for tensor in tensors:
                tensor.sum()
        phases[name] = time.perf_counter() - mark
    phases["setup + page-in"] = (
        phases["setup (ensure_weights + Engine.load)"]
        + phases["first use of every weight"]
        - phases["same again (compute only)"]
    )
    import resource

    phases["peak RSS GB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return phases


def build(variant, root: Path) -> None:
    from fastsd_testing import random_models

    print(f"building {variant.name} (full size, random weights) under {root} ...", flush=True)
    random_models.build_variant(variant, root, size=random_models.FULL)


def fp16_only(full_root: Path, root: Path) -> None:
    """The layout download_weights.py fetches: every file but the full-precision weights of
    components that have fp16 ones (hard links: no copy)."""
    for source in sorted(full_root.rglob("*")):
        if not source.is_file():
            continue
        relative = source.relative_to(full_root)
        if source.name.endswith(".safetensors") and not source.name.endswith(".fp16.safetensors"):
            if any(source.parent.glob("*.fp16.safetensors")):
                continue
        target = root / relative
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd-turbo")
    parser.add_argument("--root", type=Path, default=Path("/tmp/fastsd-coldboot"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layouts", default="full,fp16", help="comma-separated: full, fp16")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one setup (to stderr)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.variant, args.root, args.profile)))
        return 0

    from fastsd import variants

    variant = variants.get_variant(args.variant)
    full_root = args.root / "full"
    build(variant, full_root)
    roots = {"full": full_root}
    if "fp16" in args.layouts:
        fp16_only(full_root, args.root / "fp16")
        roots["fp16"] = args.root / "fp16"
    results = {}
    for layout in args.layouts.split(","):
        root = roots[layout]
        files = _loaded_files(variant, root)
        reads, setups = [], []
        for run in range(args.runs):
            cold = drop_cache(files)
            seconds, size = read_all(files)
            reads.append(seconds)
            drop_cache(files)
            command = [sys.executable, __file__, "--child", "--variant", variant.name, "--root", str(root)]
            if args.profile and run == 0:
                command.append("--profile")
            done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT)
            if done.returncode != 0:
                print(done.stderr[-4000:], file=sys.stderr)
                return 1
            if args.profile and run == 0:
                print(done.stderr[-12000:], file=sys.stderr)
            setups.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"[{layout} run {run + 1}] read {seconds:.2f} s, setup "
                f"{setups[-1]['setup (ensure_weights + Engine.load)']:.2f} s",
                flush=True,
            )
        median_read = statistics.median(reads)
        phases = {name: statistics.median(s.get(name, 0.0) for s in setups) for name in setups[0]}
        median_setup = phases["setup (ensure_weights + Engine.load)"]
        results[layout] = dict(
            files=len(files),
            bytes=size,
            read_s=median_read,
            read_GBps=size / median_read / 1e9,
            page_cache_dropped=cold,
            phases=phases,
            ratio=median_setup / median_read,
            ratio_with_page_in=phases["setup + page-in"] / median_read,
        )
    print()
    from fastsd import pipelines

    device, dtype = pipelines.select_device()
    print(
        f"variant {variant.name}, {device} ({os.cpu_count()} cores), pipeline dtype {str(dtype)[6:]}, "
        f"median of {args.runs} runs"
    )
    for layout, result in results.items():
        print(
            f"\nlayout {layout}: {result['files']} files, {result['bytes'] / 1e9:.2f} GB; page cache dropped "
            f"before each run: {'yes (posix_fadvise DONTNEED)' if result['page_cache_dropped'] else 'no (warm)'}"
        )
        print(f"  read every byte          {result['read_s']:7.2f} s  ({result['read_GBps']:.2f} GB/s)")
        for name, value in result["phases"].items():
            unit = "" if name.endswith("GB") else " s"
            print(f"  {name:32} {value:7.2f}{unit}")
        print(f"  ratio setup / read             {result['ratio']:7.2f}x")
        print(f"  ratio (setup + page-in) / read {result['ratio_with_page_in']:7.2f}x")
    print("\n" + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
