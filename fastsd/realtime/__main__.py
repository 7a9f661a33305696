"""`python -m fastsd.realtime`: the realtime page and websocket, on the engine the Cog image serves.

    python -m fastsd.realtime                          # http://127.0.0.1:8000, FASTSD_VARIANT's model
    python -m fastsd.realtime --variant sdxl-turbo --port 8080
    FASTSD_REALTIME_TOKEN=... python -m fastsd.realtime --host 0.0.0.0      # any other address: a token
    docker run --gpus all -p 8000:8000 -e FASTSD_REALTIME_TOKEN=... IMAGE python -m fastsd.realtime --host 0.0.0.0
    python -m fastsd.realtime --backend http://localhost:5000               # render through a Cog server

The model comes from the same environment variables as the Cog image (FASTSD_VARIANT, FASTSD_MODEL,
FASTSD_SAFETY_CHECKER, FASTSD_WEIGHTS_URL, ...). docs/realtime.md has the protocol and the limits.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from ..batching import Batcher
from ..engine import Engine
from ..errors import ConfigurationError
from ..metrics import ServerMetrics
from ..settings import Settings
from ..variants import get_variant
from .app import create_app
from .backend import Backend, CogBackend, EngineBackend
from .settings import Access, Limits
from .transport import server_config

LIMIT_OPTIONS = ("max_connections", "max_frame_bytes", "max_frame_pixels", "max_messages_per_second", "idle_timeout")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastsd.realtime", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other needs FASTSD_REALTIME_TOKEN; in a container: 0.0.0.0)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--variant", help="the preset to load, as FASTSD_VARIANT (default: that variable, or sd-turbo)")
    parser.add_argument(
        "--backend",
        metavar="URL",
        help="render through a Cog HTTP server (http://localhost:5000) or a Replicate predictions URL instead "
        "of loading the model here; its token from FASTSD_REALTIME_BACKEND_TOKEN or REPLICATE_API_TOKEN",
    )
    for name, kind, text in (
        ("max-connections", int, "websockets served at once (default 8)"),
        ("max-frame-bytes", int, "bytes of one frame (default 2 MiB)"),
        ("max-frame-pixels", int, "pixels of one frame (default 4194304)"),
        ("max-messages-per-second", float, "messages per connection and second (default 60)"),
        ("idle-timeout", float, "seconds without a message before a connection is closed (default 300)"),
    ):
        variable = f"FASTSD_REALTIME_{name.replace('-', '_').upper()}"
        parser.add_argument(f"--{name}", type=kind, help=f"{text}; or {variable}")
    return parser.parse_args(argv)


def build_backend(args: argparse.Namespace, settings: Settings) -> Backend:
    if args.backend:
        token = settings.realtime_backend_token or settings.replicate_api_token
        return CogBackend(args.backend, get_variant(settings.variant), token)
    engine = Engine.from_settings(settings)
    batcher = Batcher(engine)
    if settings.metrics_port:
        ServerMetrics(batcher).serve(settings.metrics_port)
    return EngineBackend(engine, batcher)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    args = parse_arguments(argv)
    try:
        settings = Settings.from_environment()
        if args.variant:  # a wrong name is the option's, not FASTSD_VARIANT's
            settings = settings.with_(variant=get_variant(args.variant, "--variant").name)
        options = {name: getattr(args, name) for name in LIMIT_OPTIONS}
        limits = Limits.from_settings(settings, **options)
        # Before loading a model: a missing token fails at once.
        access = Access.for_host(args.host, settings.realtime_token, settings.realtime_origins)
        backend = build_backend(args, settings)
    except ConfigurationError as error:
        sys.exit(f"fastsd.realtime: {error}")
    app = create_app(backend, limits, access)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    query = "?token=<FASTSD_REALTIME_TOKEN>" if access.token else ""
    logging.info("realtime page: http://%s:%d/%s", shown, args.port, query)
    if isinstance(backend, CogBackend):
        logging.info("rendering through %s", backend.endpoint)
    uvicorn.Server(server_config(app, args.host, args.port, limits)).run()


if __name__ == "__main__":
    main()
