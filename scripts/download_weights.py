#!/usr/bin/env python
"""Fetch from the Hugging Face hub exactly the files fastsd loads for one or more variants.

    python scripts/download_weights.py sd-turbo [sdxl-lcm ...]   # into weights/ and lora/
    python scripts/download_weights.py --all
    python scripts/download_weights.py --list                    # variants, repos, what is on disk
    python scripts/download_weights.py --model HUB_ID --acceleration tcd   # none, lcm-lora, lightning, hyper, tcd, dmd2
    python scripts/download_weights.py sd-turbo --precision full     # fp32 files, for a CPU server
    python scripts/download_weights.py sdxl-lcm --controlnet canny,depth   # and the ControlNets it serves
    python scripts/download_weights.py sd-turbo --no-safety-checker  # a private deployment: no checkers

Each repo lands in weights/<hub id>/ (lora/<hub id>/ for LoRAs; a single file out of a repo of
many keeps its own name there) under the project root, or under FASTSD_WEIGHTS_ROOT / --root,
with a .fastsd-manifest.json that setup() checks at boot. An interrupted run resumes where it
stopped; a run over complete folders only checks them. Gated repos need HF_TOKEN. See
docs/weights.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fastsd import script_options
from fastsd.variants import ACCELERATIONS


def _status(variant, root: Path) -> str:
    """What is on disk for a variant: ready, present but unverified, damaged, or missing."""
    from fastsd.weights import layout, manifest, provision

    if provision.missing(variant, root):
        return "missing"
    try:
        if provision.damaged(variant, root):
            return "damaged"
        folders = [source.folder(root) for source in layout.sources(variant)]
        unverified = any(manifest.load(folder) is None for folder in folders if folder.is_dir())
    except ValueError:  # an unreadable manifest
        return "damaged"
    return "present (no manifest, not verified)" if unverified else "ready"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    script_options.add_deployment_options(parser)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help="variant names (see --list)")
    parser.add_argument("--all", action="store_true", help="every variant")
    parser.add_argument("--list", action="store_true", help="list the variants, their repos and what is on disk")
    parser.add_argument(
        "--model", metavar="HUB_ID", help="a custom model by hub id: SD1.5/2.x/XL, FLUX.1, FLUX.2 [klein] or Z-Image"
    )
    parser.add_argument(
        "--acceleration",
        default=None,
        choices=list(ACCELERATIONS),
        help="with --model: the acceleration recipe whose files to fetch too (default: lcm-lora for SD models; "
        "FLUX and Z-Image run their own schedule)",
    )
    parser.add_argument(
        "--no-tiny-vae",
        dest="tiny_vae",
        action="store_false",
        help="skip the tiny autoencoder (taesd / taesdxl; without it only vae=full is served)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp16", "full"),
        default="fp16",
        help="fp16 weights (default: half the bytes; what a GPU loads) or full precision (fp32: "
        "what a CPU deployment loads fastest)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after fetching, re-hash every file against the hub's sha256 (reads every byte)",
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="the folder that holds weights/ and lora/ (default: FASTSD_WEIGHTS_ROOT, else the project root)",
    )
    args = parser.parse_args(argv)

    from fastsd import variants
    from fastsd.errors import ConfigurationError
    from fastsd.settings import Settings, configure_libraries
    from fastsd.weights import download, layout

    try:
        settings = Settings.from_environment(**({"weights_root": args.root.resolve()} if args.root else {}))
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    configure_libraries(settings, downloading=True)
    root = settings.weights_root
    if args.list:
        print(f"weights root: {root}")
        for name, variant in variants.VARIANTS.items():
            print(f"{name:16} {_status(variant, root):38} {', '.join(map(str, layout.sources(variant)))}")
        return 0

    if not (args.variants or args.all or args.model):
        parser.error("name at least one VARIANT, or --all, --list or --model HUB_ID")
    # Progress bars and results go to the terminal; the library's own warnings would repeat them.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    done: dict[layout.Source, download.Fetched] = {}
    try:
        chosen = [variants.get_variant(name) for name in args.variants]
        if args.all:
            chosen += [v for v in variants.VARIANTS.values() if v not in chosen]
        if args.model:
            chosen.append(download.resolve_custom(args.model, args.acceleration, settings))
        chosen = [script_options.deployment(variant, args) for variant in chosen]
        for variant in chosen:
            print(f"{variant.name}:")
            download.fetch_variant(
                variant, settings, tiny_vae=args.tiny_vae, verify=args.verify, precision=args.precision, done=done
            )
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    total = sum(result.size for result in done.values())
    print(f"{len(done)} sources, {download.format_size(total)} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
