#!/usr/bin/env python
"""Pack a variant's weight folders into a tar that setup() can fetch at boot.

    python scripts/pack_weights.py sd-turbo sd-turbo.tar [--no-tiny-vae] [--root DIR]
    python scripts/pack_weights.py custom custom.tar --model ORG/NAME --acceleration lcm-lora

The tar holds weights/<hub id>/ and lora/<hub id>/ exactly as they sit under the weights root,
each with its .fastsd-manifest.json: a folder fetched by download_weights.py keeps its manifest
(its sizes are checked before packing; only the files it lists are packed); a folder without
one (made by hand or by fastsd_testing.random_models) gets one written into the tar, with every file's
size and sha256. The tar is uncompressed: safetensors barely compress, and inflating would cost
CPU time at every boot. Serve it over HTTP(S) with Range support and point Cog's weights
(COG_WEIGHTS) or FASTSD_WEIGHTS_URL at it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path


def _add_bytes(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(payload))


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # No owner names or ids from the packing machine: the tar is the same wherever it is made.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def pack(variant, out: Path, tiny_vae: bool = True, report=print) -> int:
    from fastsd import manifest, weights
    from fastsd.errors import ConfigurationError

    root = weights.weights_root()
    folders = []
    for role, hub_id in weights.variant_repos(variant, tiny_vae):
        if role == "model" and weights.is_local_path(hub_id):
            raise ConfigurationError(f"{hub_id} is a local folder, not under the weights root: it cannot be packed.")
        folder = weights.role_folder(role, hub_id)
        if role == "tiny_vae" and not folder.is_dir():
            report(f"{hub_id}: not here, left out (the tiny autoencoder is optional)")
            continue
        folders.append(folder)
    temporary = out.with_name(out.name + ".partial")
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
        for folder in folders:
            relative = folder.relative_to(root).as_posix()
            listed = manifest.load(folder) if folder.is_dir() else None
            if not folder.is_dir():
                raise ConfigurationError(f"{folder} is missing: fetch it first with {weights.fetch_command(variant)}")
            if listed is not None:
                problems = manifest.check(folder, listed)
                if problems:
                    raise ConfigurationError(
                        f"{folder} does not match its manifest: {', '.join(map(str, problems))}; fetch it again first."
                    )
                names = sorted(listed["files"])
                archive.add(manifest.manifest_path(folder), f"{relative}/{manifest.MANIFEST_NAME}", filter=_normalized)
            else:
                report(f"{relative}: no manifest, hashing its files to write one into the tar")
                listed = {
                    "format": manifest.FORMAT,
                    "repo": relative.split("/", 1)[1],
                    "source": "packed from local files",
                    "files": manifest.describe_local(folder),
                }
                names = sorted(listed["files"])
                _add_bytes(
                    archive, f"{relative}/{manifest.MANIFEST_NAME}", (json.dumps(listed, indent=1) + "\n").encode()
                )
            for name in names:
                archive.add(folder / name, f"{relative}/{name}", recursive=False, filter=_normalized)
            report(f"{relative}: {len(names)} files, {manifest.total_size(listed) / 1e9:.2f} GB")
    os.replace(temporary, out)
    size = out.stat().st_size
    report(f"wrote {out} ({size / 1e9:.2f} GB)")
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", help="a variant name, or custom with --model")
    parser.add_argument("out", type=Path, help="the tar to write")
    parser.add_argument("--model", metavar="HUB_ID", help="a custom base model under weights/ (variant: custom)")
    parser.add_argument(
        "--acceleration",
        default="lcm-lora",
        choices=("none", "lcm-lora"),
        help="with --model: also pack the matching LCM-LoRA (default)",
    )
    parser.add_argument(
        "--no-tiny-vae",
        dest="tiny_vae",
        action="store_false",
        help="leave out the tiny autoencoder (taesd / taesdxl), packed by default when present",
    )
    parser.add_argument("--root", type=Path, help="the folder that holds weights/ and lora/")
    args = parser.parse_args(argv)
    if args.root:
        os.environ["FASTSD_WEIGHTS_ROOT"] = str(args.root.resolve())
    from fastsd import variants, weights
    from fastsd.errors import ConfigurationError

    try:
        if args.model:
            variant = variants.custom_variant(args.model, weights.model_folder(args.model), args.acceleration)
        else:
            variant = variants.get_variant(args.variant)
        pack(variant, args.out, args.tiny_vae)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
