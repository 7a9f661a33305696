#!/usr/bin/env python
"""Make `cog build` produce an image for one variant, with its weights baked in.

    python scripts/download_weights.py sdxl-lcm     # the weights, into weights/ and lora/
    python scripts/select_variant.py sdxl-lcm       # .dockerignore + cog.yaml for that variant
    cog build -t sdxl-lcm

`cog build` sends the project folder to Docker, minus what .dockerignore names. This writes a
.dockerignore that keeps out every weights folder but the variant's (and the tests, caches,
.git, .venv), and sets the `- FASTSD_VARIANT=...` and `- FASTSD_CONTROLNETS=...` lines of
cog.yaml's environment: list, the variant and the ControlNets the image serves (--controlnet
canny,depth; none by default). Nothing else in cog.yaml changes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Never in an image: version control, environments, caches, tests, their helpers (fastsd_testing)
# and outputs, and local leftovers (.whl: scripts/gpu-wheels; .venv-publish: scripts/push without .venv).
ALWAYS_EXCLUDED = [
    ".git",
    ".gitignore",
    ".venv",
    ".venv-publish",
    ".whl",
    ".ci",
    ".pytest_cache",
    "**/__pycache__",
    "**/*.pyc",
    "tests",
    "fastsd_testing",
    "*.egg-info",
    "docs",
    "benchmarks",
    "outputs",
    "*.tar",
    "*.tar.partial",
]
_VARIANT_LINE = re.compile(r"^(?P<indent>[ \t]*-[ \t]*)FASTSD_VARIANT=[^\s#]*(?P<rest>.*)$", re.MULTILINE)
_CONTROLNETS_LINE = re.compile(r"^(?P<indent>[ \t]*-[ \t]*)FASTSD_CONTROLNETS=[^\s#]*", re.MULTILINE)


def kept_paths(sources) -> list[str]:
    """The .dockerignore lines that let a variant's weights back in, from its sources (fastsd.layout):
    a whole folder, or one file of a shared folder with the folder's manifest; then, for a base
    whose UNet or VAE the preset replaces, those weights out again (later lines win)."""
    lines = []
    for source in sources:
        folder = source.relative_folder.as_posix()
        if source.filename:
            lines += [f"!{folder}/{source.filename}", f"!{folder}/.fastsd-manifest.json"]
        else:
            lines.append(f"!{folder}/**")
            lines += [f"{folder}/{component}/*.safetensors" for component in source.skip]
    return list(dict.fromkeys(lines))


def dockerignore_text(variant_name: str, kept: list[str]) -> str:
    """kept: kept_paths() of the variant's sources."""
    lines = [
        f"# Written by `python scripts/select_variant.py {variant_name}`: what `cog build` leaves out of the image.",
        "# The code goes in, with the weights of this variant only; run the command again for another.",
        *ALWAYS_EXCLUDED,
        "# Every weights folder ... (later lines win: the ! lines below let this variant's back in)",
        "weights/**",
        "lora/**",
        *kept,
        "# ... but not huggingface_hub's resume metadata, nor a fetch that was cut short.",
        "**/.cache/huggingface",
        ".fastsd-incoming-*",
        "",
    ]
    return "\n".join(lines)


def set_cog_variant(cog_yaml: str, variant_name: str, controlnets: tuple[str, ...] = ()) -> str:
    """cog.yaml with its `- FASTSD_VARIANT=...` environment line naming variant_name, and a
    `- FASTSD_CONTROLNETS=...` line (after it, if there was none) naming the ControlNets served."""
    if not _VARIANT_LINE.search(cog_yaml):
        raise ValueError(
            "cog.yaml has no `  - FASTSD_VARIANT=...` line under environment:; add one "
            "(environment:\\n  - FASTSD_VARIANT=sd-turbo) and run this again."
        )
    served = ",".join(controlnets)
    if _CONTROLNETS_LINE.search(cog_yaml):
        cog_yaml = _CONTROLNETS_LINE.sub(lambda m: f"{m['indent']}FASTSD_CONTROLNETS={served}", cog_yaml, count=1)
    else:
        cog_yaml = _VARIANT_LINE.sub(lambda m: f"{m[0]}\n{m['indent']}FASTSD_CONTROLNETS={served}", cog_yaml, count=1)
    return _VARIANT_LINE.sub(lambda m: f"{m['indent']}FASTSD_VARIANT={variant_name}{m['rest']}", cog_yaml, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument(
        "--no-tiny-vae",
        dest="tiny_vae",
        action="store_false",
        help="leave the tiny autoencoder (taesd / taesdxl) out of the image",
    )
    parser.add_argument(
        "--controlnet",
        default="",
        metavar="NAMES",
        help="ControlNets to serve too, comma-separated: canny, depth (as FASTSD_CONTROLNETS; default none)",
    )
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from fastsd import layout, variants
    from fastsd.errors import ConfigurationError

    try:
        variant = variants.get_variant(args.variant).with_controlnets(variants.controlnets_from(args.controlnet))
        cog_path = args.project / "cog.yaml"
        cog_yaml = set_cog_variant(cog_path.read_text(), variant.name, variant.controlnets)
    except (ConfigurationError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # The paths as the image sees them: relative to the project folder that cog build sends.
    sources = [source for source in layout.sources(variant, args.tiny_vae) if not source.is_local]
    (args.project / ".dockerignore").write_text(dockerignore_text(variant.name, kept_paths(sources)))
    cog_path.write_text(cog_yaml)
    shown = ", ".join((source.relative_folder / (source.filename or "")).as_posix() for source in sources)
    print(
        f"selected {variant.name}: .dockerignore keeps {shown}; cog.yaml FASTSD_VARIANT={variant.name}, "
        f"FASTSD_CONTROLNETS={','.join(variant.controlnets)}"
    )
    missing = [s for s in sources if not (args.project / s.relative_folder / s.marker_name).exists()]
    if missing:
        print(
            f"note: {', '.join(map(str, missing))} not here yet: run {layout.fetch_command(variant)} before cog build "
            "(else the image fetches what it needs at boot, from FASTSD_WEIGHTS_URL or the hub)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
