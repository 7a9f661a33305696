"""Time to first image with a per-request LoRA, new and cached, through the real Cog server.

    python scripts/lora_benchmark.py                 # full-size sd-turbo, rank-64 kohya LoRAs with text-encoder layers
    python scripts/lora_benchmark.py --quick         # tiny models: a smoke run
    python scripts/lora_benchmark.py --compile 1     # a compiled UNet: LoRAs hot-swapped into its slots
    python scripts/lora_benchmark.py --quick --variant flux-schnell   # a transformer's (diffusers-format) LoRAs

Each run serves a LoRA the server has never seen (random weights in kohya's published format, as
Civitai files are) from a loopback server, with FASTSD_ALLOW_PRIVATE_URLS=1 so the model may fetch
from it, then asks for:
1. new: the first image with that LoRA (download, safetensors check, load as an adapter, generate);
2. cached: a second image with it (different seed): no download, no load;
3. without: an image without any LoRA, after it (adapters disabled).
Default inputs otherwise (sd-turbo: 512x512, 1 step, TAESD). Prints medians and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from fastsd import variants
from fastsd.pipelines import select_device
from fastsd.settings import Settings
from fastsd_testing.bench import Report, add_options, build_random_weights, resolve_options, timed_prediction
from fastsd_testing.cog_server import CogServer
from fastsd_testing.user_loras import FileServer, write_transformer_lora, write_user_lora

PROMPT = "a watercolour of a harbour town at sunrise"


def timed(server: CogServer, **inputs) -> float:
    return timed_prediction(server, prompt=PROMPT, **inputs)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, runs=5, quick_runs=5)  # runs: LoRAs to try, each new then cached
    parser.add_argument("--rank", type=int, help="LoRA rank (default 64; 4 with --quick)")
    parser.add_argument("--compile", help="FASTSD_COMPILE for the server (on, or a torch.compile mode)")
    args = resolve_options(parser.parse_args())
    rank = args.rank or (4 if args.quick else 64)
    root = args.root
    variant = variants.VARIANTS[args.variant]
    device, dtype = select_device()
    build_random_weights(variant, root, args.size, device)

    scratch = Path(tempfile.mkdtemp(prefix="fastsd-lora-bench-"))
    files, sizes = {}, []
    for index in range(args.runs):
        if not variant.has_unet:  # the transformers' LoRAs: diffusers' names, attention and feed-forward
            model = root / "weights" / variant.model
            path = write_transformer_lora(model, scratch / f"{index}.safetensors", rank=rank, seed=index)
        else:
            path = write_user_lora(
                root / "weights" / variant.model,
                scratch / f"{index}.safetensors",
                rank,
                text_encoder=True,
                seed=index,
                convolutions=not args.compile,  # a compiled UNet's slots hold kohya's default layers only
            )
        files[f"/style-{index}.safetensors"] = path.read_bytes()
        sizes.append(path.stat().st_size)
    print(f"{args.runs} LoRAs of rank {rank}, {statistics.median(sizes) / 2**20:.0f} MiB each", flush=True)

    timings = {"new": [], "cached": [], "without": []}
    with FileServer(files) as lora_server:
        environment = {
            "FASTSD_VARIANT": variant.name,
            "FASTSD_WEIGHTS_ROOT": str(root),
            "FASTSD_ALLOW_PRIVATE_URLS": "1",
            "FASTSD_LORA_CACHE": str(scratch / "cache"),
            **({"FASTSD_COMPILE": args.compile} if args.compile else {}),
        }
        log_path = scratch / "server.log"
        server = CogServer(environment, log_path)
        try:
            if server.wait_for_setup()["status"] != "READY":
                print(log_path.read_text()[-3000:])
                return 1
            timed(server, seed=0)  # the first request's one-off costs belong to no case
            for index in range(args.runs):
                url = lora_server.url(f"/style-{index}.safetensors")
                timings["new"].append(timed(server, lora_weights=url, seed=index))
                timings["cached"].append(timed(server, lora_weights=url, seed=index + 100))
                timings["without"].append(timed(server, seed=index))
                print({case: round(values[-1], 2) for case, values in timings.items()}, flush=True)
        finally:
            server.stop()

    medians = {case: round(statistics.median(values), 3) for case, values in timings.items()}
    report = Report(f"lora-{variant.name}", args, device, dtype, variant=variant.name, compile=args.compile)
    unet = variant.has_unet
    report["lora"] = {"format": "kohya" if unet else "peft", "rank": rank, "text_encoder": unet,
                      "convolutions": unet and not args.compile,
                      "mib": round(statistics.median(sizes) / 2**20, 1)}  # fmt: skip
    # The server's slots' rank, as it reads FASTSD_LORA_MAX_RANK (this process's environment).
    report["lora_slots_rank"] = Settings.from_environment().lora_max_rank if args.compile else None
    report["runs"] = args.runs
    report["median_s"] = medians
    report["all_s"] = {case: [round(v, 3) for v in values] for case, values in timings.items()}
    print(json.dumps(medians))
    print(f"wrote {report.write()}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
