#!/usr/bin/env python
"""Make `cog build` produce an image for one variant, with its weights baked in.

    python scripts/download_weights.py sdxl-lcm     # the weights, into weights/ and lora/
    python scripts/select_variant.py sdxl-lcm       # .dockerignore + cog.yaml for that variant
    cog build -t sdxl-lcm

`cog build` sends the project folder to Docker, minus what .dockerignore names. This writes a
.dockerignore that keeps out every weights folder but the variant's (and the tests, caches,
.git, .venv), and sets the `- FASTSD_VARIANT=...`, `- FASTSD_CONTROLNETS=...` and
`- FASTSD_SAFETY_CHECKER=...` lines of cog.yaml's environment: list, the variant, the ControlNets
the image serves (--controlnet canny,depth; none by default) and whether it checks images (on;
--no-safety-checker for a private deployment). Nothing else in cog.yaml changes.
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
    ".hypothesis",
    "**/__pycache__",
    "**/*.pyc",
    "tests",
    "fastsd_testing",
    "*.egg-info",
    "docs",
    "deploy",
    "benchmarks",
    "outputs",
    "*.tar",
    "*.tar.partial",
]
_VARIANT_LINE = re.compile(r"^(?P<indent>[ \t]*-[ \t]*)FASTSD_VARIANT=[^\s#]*(?P<rest>.*)$", re.MULTILINE)


def kept_paths(sources) -> list[str]:
    """The .dockerignore lines that let a variant's weights back in, from its sources (fastsd.weights.layout):
    a whole folder, or one file or subfolders of a shared folder with the folder's manifest; then, for a base
    whose UNet or VAE the preset replaces, those weights out again (later lines win)."""
    lines = []
    for source in sources:
        folder = source.relative_folder.as_posix()
        if source.parts:  # a file or subfolders of a shared folder
            lines += [f"!{folder}/{part}" + ("**" if part.endswith("/") else "") for part in source.parts]
            lines.append(f"!{folder}/.fastsd-manifest.json")
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


def set_cog_variant(
    cog_yaml: str, variant_name: str, controlnets: tuple[str, ...] = (), safety_checker: bool = True
) -> str:
    """cog.yaml with its `- FASTSD_VARIANT=...` environment line naming variant_name, and the
    `- FASTSD_CONTROLNETS=...` and `- FASTSD_SAFETY_CHECKER=...` lines (added after it where there
    were none) naming the ControlNets served and whether images are checked."""
    if not _VARIANT_LINE.search(cog_yaml):
        raise ValueError(
            "cog.yaml has no `  - FASTSD_VARIANT=...` line under environment:; add one "
            "(environment:\\n  - FASTSD_VARIANT=sd-turbo) and run this again."
        )
    settings = {"FASTSD_SAFETY_CHECKER": "on" if safety_checker else "off", "FASTSD_CONTROLNETS": ",".join(controlnets)}
    for name, value in settings.items():
        line = re.compile(rf"^(?P<indent>[ \t]*-[ \t]*){name}=[^\s#]*", re.MULTILINE)
        if line.search(cog_yaml):
            cog_yaml = line.sub(lambda m, name=name, value=value: f"{m['indent']}{name}={value}", cog_yaml, count=1)
        else:
            cog_yaml = _VARIANT_LINE.sub(
                lambda m, name=name, value=value: f"{m[0]}\n{m['indent']}{name}={value}", cog_yaml, count=1
            )
    return _VARIANT_LINE.sub(lambda m: f"{m['indent']}FASTSD_VARIANT={variant_name}{m['rest']}", cog_yaml, count=1)


def main(argv: list[str] | None = None) -> int:
    from fastsd import script_options

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    script_options.add_deployment_options(parser)
    parser.add_argument("variant")
    parser.add_argument(
        "--no-tiny-vae",
        dest="tiny_vae",
        action="store_false",
        help="leave the tiny autoencoder (taesd / taesdxl) out of the image",
    )
    parser.add_argument("--project", type=Path, default=PROJECT_ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from fastsd import variants
    from fastsd.errors import ConfigurationError
    from fastsd.weights import layout

    try:
        variant = script_options.deployment(variants.get_variant(args.variant), args)
        cog_path = args.project / "cog.yaml"
        cog_yaml = set_cog_variant(cog_path.read_text(), variant.name, variant.controlnets, variant.safety_checker)
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
        f"FASTSD_CONTROLNETS={','.join(variant.controlnets)}, "
        f"FASTSD_SAFETY_CHECKER={'on' if variant.safety_checker else 'off'}"
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
