#!/usr/bin/env python
"""Pack a variant's weight folders into a tar that setup() can fetch at boot.

    python scripts/pack_weights.py sd-turbo sd-turbo.tar [--no-tiny-vae] [--root DIR]
    python scripts/pack_weights.py custom custom.tar --model ORG/NAME --acceleration lcm-lora

The tar holds weights/<hub id>/ and lora/<hub id>/ as they sit under the weights root, with only
the files the variant loads, each folder with a .fastsd-manifest.json of them: a folder fetched
by download_weights.py gives its manifest's entries (sizes checked before packing); a folder
without one (made by hand or by fastsd_testing.random_models) gets its files hashed (sha256).
The tar is uncompressed: safetensors barely compress, and inflating would cost
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


def pack(variant, root: Path, out: Path, tiny_vae: bool = True, report=print) -> int:
    """The variant's weights under root as a tar at out; its size."""
    from fastsd.errors import ConfigurationError
    from fastsd.weights import layout, manifest

    # The files of each folder that the variant loads: a shared folder (a repo of many LoRAs, a
    # base whose VAE the preset replaces) is packed with only those, and a manifest of them.
    by_folder: dict[Path, list[layout.Source]] = {}
    for source in layout.sources(variant, tiny_vae):
        if source.is_local:
            raise ConfigurationError(f"{source.repo} is a local folder, outside the weights root: it cannot be packed.")
        if source.optional and not source.folder(root).is_dir():
            report(f"{source}: not here, left out (the tiny autoencoder is optional)")
            continue
        if not source.marker(root).is_file():
            command = layout.fetch_command(variant)
            raise ConfigurationError(f"{source.marker(root)} is missing: fetch it first with {command}")
        by_folder.setdefault(source.relative_folder, []).append(source)
    temporary = out.with_name(out.name + ".partial")
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
        for relative_folder, folder_sources in by_folder.items():
            folder, relative = root / relative_folder, relative_folder.as_posix()

            def packed(name: str, folder_sources=folder_sources) -> bool:
                return any(source.covers(name) for source in folder_sources)

            listed = manifest.load(folder)
            if listed is not None:
                listed = manifest.restricted(listed, packed)
                problems = manifest.check(folder, listed)
                if problems:
                    raise ConfigurationError(
                        f"{folder} does not match its manifest: {', '.join(map(str, problems))}; fetch it again first."
                    )
            else:
                report(f"{relative}: no manifest, hashing its files to write one into the tar")
                listed = {
                    "format": manifest.FORMAT,
                    "repo": relative.split("/", 1)[1],
                    "source": "packed from local files",
                    "files": {name: entry for name, entry in manifest.describe_local(folder).items() if packed(name)},
                }
            _add_bytes(archive, f"{relative}/{manifest.MANIFEST_NAME}", (json.dumps(listed, indent=1) + "\n").encode())
            names = sorted(listed["files"])
            for name in names:
                archive.add(folder / name, f"{relative}/{name}", recursive=False, filter=_normalized)
            report(f"{relative}: {len(names)} files, {manifest.total_size(listed) / 1e9:.2f} GB")
    os.replace(temporary, out)
    size = out.stat().st_size
    report(f"wrote {out} ({size / 1e9:.2f} GB)")
    return size


def main(argv: list[str] | None = None) -> int:
    from fastsd import script_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    script_options.add_deployment_options(parser)
    parser.add_argument("variant", help="a variant name, or custom with --model")
    parser.add_argument("out", type=Path, help="the tar to write")
    parser.add_argument("--model", metavar="HUB_ID", help="a custom base model under weights/ (variant: custom)")
    parser.add_argument(
        "--acceleration",
        default=None,
        help="with --model: the acceleration whose files to pack too (default: lcm-lora for SD models)",
    )
    parser.add_argument(
        "--no-tiny-vae",
        dest="tiny_vae",
        action="store_false",
        help="leave out the tiny autoencoder (taesd / taesdxl), packed by default when present",
    )
    parser.add_argument("--root", type=Path, help="the folder that holds weights/ and lora/")
    args = parser.parse_args(argv)
    from fastsd import variants
    from fastsd.errors import ConfigurationError
    from fastsd.settings import Settings
    from fastsd.weights import layout

    try:
        root = args.root.resolve() if args.root else Settings.from_environment().weights_root
        if args.model:
            variant = variants.custom_variant(args.model, layout.model_folder(root, args.model), args.acceleration)
        else:
            variant = variants.get_variant(args.variant)
        variant = script_options.deployment(variant, args)
        pack(variant, root, args.out, args.tiny_vae)
    except ConfigurationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
