"""The realtime server's limits and access rules: defaults, the deployment's settings
(FASTSD_REALTIME_*, fastsd.settings) and the command line's options over them."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from ..settings import Settings

TOKEN_ENV = "FASTSD_REALTIME_TOKEN"
ORIGINS_ENV = "FASTSD_REALTIME_ORIGINS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 8  # websockets served at once; one more is told so and closed
    max_frame_bytes: int = 2 * 1024 * 1024  # one binary frame (a 512x512 JPEG is ~50 KB)
    max_frame_pixels: int = 4 * 1024 * 1024  # width x height of a frame, read from its header
    max_messages_per_second: float = 60  # per connection, with a burst of one second's worth (at least 1)
    idle_timeout: float = 300.0  # seconds without a message from the client before it is closed

    @property
    def max_message_bytes(self) -> int:
        """What the websocket layer accepts at all: above the frame limit, so that a frame a little
        too large gets its error message rather than a closed connection."""
        return 2 * self.max_frame_bytes + 65536

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> Limits:
        """Each limit from the command line's option, else FASTSD_REALTIME_<NAME>, else the default."""
        values = {}
        for field in fields(cls):
            given = options.get(field.name)
            given = getattr(settings, f"realtime_{field.name}") if given is None else given
            if given is not None:
                if given <= 0:
                    raise ConfigurationError(f"--{field.name.replace('_', '-')} must be above 0, got {given}.")
                values[field.name] = given
        return cls(**values)


def bearer_token(authorization: str) -> str:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case, RFC 9110);
    "" for any other scheme or none."""
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Who may open the websocket. On a loopback address: pages served from this machine's own
    names (a page elsewhere must not drive the user's local server, nor a DNS name rebound to it).
    On any other address: a token as well, and pages from the server's own origin or the listed ones."""

    loopback: bool = True
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()

    @classmethod
    def for_host(cls, host: str, token: str | None = None, origins: tuple[str, ...] = ()) -> Access:
        """The rules for a server listening on host (token: FASTSD_REALTIME_TOKEN; origins:
        FASTSD_REALTIME_ORIGINS)."""
        token = (token or "").strip() or None
        allowed = tuple(origin.rstrip("/") for origin in origins)
        loopback = is_loopback(host)
        if not loopback and token is None:
            raise ConfigurationError(
                f"listening on {host} (not a loopback address) needs {TOKEN_ENV}: the token every client must "
                "give (the page: /?token=...); or listen on 127.0.0.1."
            )
        return cls(loopback=loopback, token=token, allowed_origins=allowed)

    @property
    def allowed_hosts(self) -> list[str]:
        """Host headers the server answers (Starlette's TrustedHostMiddleware)."""
        return ["localhost", "127.0.0.1", "::1", "[::1]"] if self.loopback else ["*"]

    def refusal(self, headers, query_params) -> str | None:
        """Why a websocket handshake is refused, or None. Browsers always send Origin; a client
        that sends none is not a page and needs only the token."""
        origin = headers.get("origin")
        if origin is not None:
            own = urlsplit(origin).netloc == headers.get("host", "")
            if not (own or origin.rstrip("/") in self.allowed_origins):
                return f"origin {origin} is not allowed (set {ORIGINS_ENV} to allow it)"
        if self.token is not None:
            given = query_params.get("token") or bearer_token(headers.get("authorization", ""))
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return f"the token is missing or wrong ({TOKEN_ENV}; the page takes it as /?token=...)"
        return None
