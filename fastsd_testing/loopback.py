"""An HTTP server on 127.0.0.1 for tests: a subclass answers each request in respond()."""

from __future__ import annotations

import http.server
import socket
import threading


class LoopbackServer:
    """HTTP/1.1 on a free loopback port (host: 127.0.0.1, or ::1), served from a thread until close()
    (or the with block ends). Every test server is one: the hub, a weights tar, users' LoRAs."""

    def __init__(self, host: str = "127.0.0.1"):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.respond(self, send_body=True)

            def do_HEAD(self):
                server.respond(self, send_body=False)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.httpd = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.root = f"http://{shown}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, handler: http.server.BaseHTTPRequestHandler, send_body: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def reply(handler, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if send_body:
        handler.wfile.write(body)
