"""The HTTP layer under the realtime app (uvicorn), as every caller runs it: the command, the tests
and the benchmark. Two protections uvicorn does not give by default:

- a deadline for a request's headers: uvicorn holds a connection that never finishes its headers
  for as long as the peer likes (its keep-alive timer starts only after a first response);
- no secret in the logs: uvicorn writes each request's path with its query string, and the page
  carries the access token as `?token=...`. Every log line of the server goes through a filter
  that blanks the value of a `token` parameter, whoever sent it (a near miss is a secret too).
"""

from __future__ import annotations

import copy
import logging
import re

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Limits

HEADER_DEADLINE_S = 10.0  # from the connection (or the last response) to a request's complete headers
_TOKEN_VALUE = re.compile(r"((?:^|[?&;])token=)[^&\s\"';]*", re.IGNORECASE)


def redact(text: str) -> str:
    """text with the value of any token= parameter blanked."""
    return _TOKEN_VALUE.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Blanks token values in a record's message and arguments (uvicorn passes the path as an argument)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    HEADER_DEADLINE_S of its opening (or of its last response). A websocket, once upgraded, is the
    app's: its idle timeout governs it."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = self.loop.call_later(HEADER_DEADLINE_S, self._headers_late)

    def _headers_late(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._deadline.cancel()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(HEADER_DEADLINE_S, self._headers_late)

    def handle_websocket_upgrade(self, event) -> None:
        self._deadline.cancel()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        super().connection_lost(exc)


def log_config() -> dict:
    """uvicorn's own logging configuration, every handler filtered through RedactTokens."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_tokens": {"()": RedactTokens}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_tokens"]
    return config


def server_config(app, host: str, port: int, limits: Limits, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=HeaderDeadline,
        ws_max_size=limits.max_message_bytes,
        # Connections and tasks at once: the websockets, and room for page loads and health checks.
        limit_concurrency=4 * limits.max_connections + 16,
        log_config=log_config(),
        log_level=log_level,
    )
