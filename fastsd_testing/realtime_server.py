"""The realtime app on a real uvicorn server in a thread of this process, on a free loopback port:
for the browser tests and the benchmark, which look at (or gate) the engine the server runs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from fastsd.realtime.settings import Limits
from fastsd.realtime.transport import server_config


@contextlib.contextmanager
def serving(app, limits: Limits | None = None):
    """Yields the server's base URL (http://127.0.0.1:PORT) once it accepts connections: the app on
    the HTTP layer the command runs (fastsd.realtime.transport)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = server_config(app, "127.0.0.1", port, limits or Limits(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="realtime-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the realtime server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
