"""Make images from the command line, without Docker or Cog: the same engine and checks as the server.

    .venv/bin/python scripts/generate.py "a lighthouse at dawn"                # sd-turbo, 512x512 webp
    .venv/bin/python scripts/generate.py "a watercolour fox" --variant sdxl-lcm --num-outputs 2 --seed 7
    .venv/bin/python scripts/generate.py "a red barn at night" --image barn.jpg --strength 0.6

Images are written to outputs/ (or --out). The variant comes from --variant, else FASTSD_VARIANT.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from fastsd.engine import Engine
from fastsd.errors import ConfigurationError, InputError
from fastsd.variants import get_variant
from fastsd.weights.layout import python_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--variant", help="a variant name (default: FASTSD_VARIANT or sd-turbo)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images (default: outputs)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--image", type=Path, help="starting image for image-to-image")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--num-inference-steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--output-format", default="webp", choices=["webp", "jpg", "png"])
    parser.add_argument("--output-quality", type=int, default=80)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.variant:
            get_variant(args.variant, "--variant")  # a wrong name is the option's, not FASTSD_VARIANT's
            os.environ["FASTSD_VARIANT"] = args.variant
        engine = Engine.from_environment()
        request = engine.validate(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            image=args.image,
            strength=args.strength,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            width=args.width,
            height=args.height,
            num_outputs=args.num_outputs,
            seed=args.seed,
            output_format=args.output_format,
            output_quality=args.output_quality,
        )
    except (ConfigurationError, InputError) as error:
        print(f"error: {error}", file=sys.stderr)
        if "are missing" in str(error):
            variant = os.environ.get("FASTSD_VARIANT", "sd-turbo")
            print(
                f"No hub access? `{python_command()} -m fastsd_testing.random_models {variant}` writes a tiny "
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
