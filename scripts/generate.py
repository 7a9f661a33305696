"""Make images from the command line, without Docker or Cog: the same engine and checks as the server.

    .venv/bin/python scripts/generate.py "a lighthouse at dawn"                # sd-turbo, 512x512 webp
    .venv/bin/python scripts/generate.py "a watercolour fox" --variant sdxl-lcm --num-outputs 2 --seed 7
    .venv/bin/python scripts/generate.py "a red barn at night" --image barn.jpg --strength 0.6

Every input of the API is an option (README: Inputs; fastsd.inputs). Images are written to outputs/
(or --out). The variant comes from --variant, else FASTSD_VARIANT; the rest of the deployment's
settings from the environment (docs/settings.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from fastsd.engine import Engine
from fastsd.errors import ConfigurationError, InputError
from fastsd.inputs import IMAGE_INPUTS, INPUTS
from fastsd.settings import Settings
from fastsd.variants import get_variant
from fastsd.weights.layout import python_command


def _switch(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError("true or false")
    return text.lower() == "true"


def _option_type(name: str, row):
    if name in IMAGE_INPUTS:
        return Path  # a local image file
    if row.low is not None:
        return type(row.low)  # int or float, as its bounds are written
    return _switch if isinstance(row.default, bool) else str


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--variant", help="a variant name (default: FASTSD_VARIANT or sd-turbo)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images (default: outputs)")
    for name, row in INPUTS.items():
        if name == "prompt":
            continue
        kind = _option_type(name, row)
        shown = f" (default {row.default})" if row.default is not None else ""
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, choices=row.choices or None, help=f"{name}{shown}",
            nargs="+" if row.many else None,
        )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {name: getattr(args, name) for name in INPUTS if getattr(args, name) is not None}
    try:
        settings = Settings.from_environment()
        if args.variant:  # a wrong name is the option's, not FASTSD_VARIANT's
            settings = settings.with_(variant=get_variant(args.variant, "--variant").name)
        engine = Engine.from_settings(settings)
        request = engine.validate(**given)
    except (ConfigurationError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        if "are missing" in str(error):
            print(
                f"No hub access? `{python_command()} -m fastsd_testing.random_models {settings.variant}` writes a tiny "
                "random-weight model in the real layout, to try every command (its images are noise).",
                file=sys.stderr,
            )
        return 2
    result = engine.generate(request)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(engine.save(result, request)):
        target = args.out / f"{engine.variant.name}-{result.seed + index}.{request.output_format}"
        shutil.copyfile(path, target)
        print(target)
    print(f"seed {result.seed}, {result.inference_time:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
