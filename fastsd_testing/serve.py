"""`scripts/serve`: everything a newcomer's first server needs, then the Cog server as the image runs it.

    scripts/serve                      # the variant's weights fetched from the hub if missing, then serve
    scripts/serve --random-weights     # offline: a tiny random-weight model in the real layout
    scripts/serve --port 5001 --host 0.0.0.0

The variant and weights root come from the environment, as in the image (FASTSD_VARIANT,
FASTSD_WEIGHTS_ROOT, FASTSD_CONTROLNETS, FASTSD_SAFETY_CHECKER; FASTSD_MODEL's fine-tunes are
fetched by the server's own setup). The server runs in a folder of its own with the input schema
`cog build` would write (fastsd_testing.cog_schema), so it validates requests as the image does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from fastsd.errors import ConfigurationError
from fastsd.settings import Settings

from .cog_server import run_folder, server_command, server_environment

OFFLINE = (
    "To try fastsd without the hub, serve a tiny random-weight model in the real layout instead: "
    "scripts/serve --random-weights (every request works; its images are noise)."
)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")), help="default 5000")
    parser.add_argument(
        "--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0 listens on every address"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="write a tiny random-weight model of the variant (offline, seconds) where its weights are missing",
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be from 1 to 65535, got {args.port}")
    return args


def prepare_weights(settings: Settings, random_weights: bool) -> str | None:
    """The variant's weights on disk; a sentence saying why not (and what to do) otherwise."""
    from fastsd.errors import ConfigurationError
    from fastsd.variants import variant_for
    from fastsd.weights import download, layout, provision

    if settings.model:
        return None  # a fine-tune's architecture is read from its files: the server's setup fetches it
    try:
        variant = variant_for(settings, lambda model: layout.model_folder(settings.weights_root, model))
    except ConfigurationError as error:
        return str(error)
    if not provision.missing(variant, settings.weights_root):
        return None
    if random_weights:
        from . import random_models

        random_models.quiet()
        random_models.build_variant(variant, settings.weights_root)
        random_models.write_manifests(variant, settings.weights_root)
        print(f"fastsd: wrote a tiny random-weight {variant.name} under {settings.weights_root}", flush=True)
        return None
    print(f"fastsd: fetching the weights of {variant.name} from the hub ({settings.hub})", flush=True)
    try:
        download.fetch_variant(variant, settings, progress=True, report=lambda line: print(line, flush=True))
    except download.WeightsDownloadError as error:
        return f"{error} {OFFLINE}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        settings = Settings.from_environment()
    except ConfigurationError as error:
        print(f"fastsd: {error}", file=sys.stderr)
        return 1
    problem = prepare_weights(settings, args.random_weights)
    if problem:
        print(f"fastsd: {problem}", file=sys.stderr)
        return 1
    scratch = Path(tempfile.gettempdir()) / f"fastsd-serve-{args.port}"
    environment = server_environment(args.port, scratch)
    folder = run_folder(scratch / "run", environment["COG_PREDICT_TYPE_STUB"])
    print(
        f"fastsd: serving predict.py on http://{args.host}:{args.port} with {environment['COG_MAX_CONCURRENCY']} "
        "slots and the image's input schema; READY at /health-check once setup is done (Ctrl-C stops it)",
        flush=True,
    )
    os.chdir(folder)
    os.execvpe(server_command(args.host)[0], server_command(args.host), environment)
    return 0  # not reached: the server replaces this process


if __name__ == "__main__":
    sys.exit(main())
