"""Fetching a file a stranger names (a LoRA URL), without letting the request reach where it should not.

- The URL: https only, no user name or password (they would travel to the host), a valid host name
  and port; every refusal is one sentence naming the input.
- The address: the host must resolve to public addresses only, decided by what each address is
  (is_public), after resolution; the connection goes to the address that was checked, so a second
  lookup cannot swap it (DNS rebinding). Every redirect, up to MAX_REDIRECTS, is checked the same way.
- Time: one deadline for the whole exchange (connect, TLS, response headers, body, every redirect),
  and an idle timeout per read, so a trickling sender cannot hold a slot.
- Size: a cap, from the Content-Length first, then on the bytes as they come.
- A failed connection reads the same whatever the cause (refused, reset, TLS, timeout), so the
  errors do not tell open ports from closed ones. The file is written under a temporary name and
  renamed only when complete: a partial download is never used.

FASTSD_ALLOW_PRIVATE_URLS=1 lifts the address rule (and allows http) for tests that serve files
from a loopback server. It is off by default and must stay off on a public deployment.
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import os
import re
import socket
import ssl
import string
import time
import uuid
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urljoin, urlsplit

from ..errors import InputError

ALLOW_PRIVATE_ENV = "FASTSD_ALLOW_PRIVATE_URLS"
MAX_REDIRECTS = 5
CHUNK = 1 << 16


# --- which addresses are public ----------------------------------------------------------------

_net = ipaddress.ip_network
# IPv4 blocks the standard library calls global (Python 3.11) that reach no public server.
_NOT_PUBLIC_V4 = (_net("192.0.0.0/24"), _net("192.88.99.0/24"))  # IETF protocol use; the old 6to4 relays
_GLOBAL_UNICAST_V6 = _net("2000::/3")  # the only IPv6 space handed out to public networks
_NOT_PUBLIC_V6 = (
    _net("2001::/23"),  # IETF protocol use: benchmarking, ORCHID, anycast services (Teredo is read below)
    _net("2001:db8::/32"),  # documentation
    _net("3fff::/20"),  # documentation (RFC 9637)
    _net("3ffe::/16"),  # the 6bone, returned
)
# IPv6 addresses that stand for an IPv4 address in their low 32 bits: a connection to one reaches
# that IPv4 address (dual-stack sockets, SIIT and NAT64 translators). ::/96 holds :: and ::1 too.
_CARRIES_IPV4_LOW = (
    _net("::/96"),  # IPv4-compatible, ::a.b.c.d
    _net("::ffff:0:0/96"),  # IPv4-mapped, ::ffff:a.b.c.d
    _net("::ffff:0:0:0/96"),  # IPv4-translated, ::ffff:0:a.b.c.d
    _net("64:ff9b::/96"),  # NAT64
)
# The local-use NAT64 prefix 64:ff9b:1::/48 is outside 2000::/3, so refused: where its IPv4 address
# sits depends on the operator's prefix length, so what it reaches is not known from the address.


def is_public(address: str) -> bool:
    """True only for an address known to reach the public internet: global unicast, and an IPv6
    address that carries an IPv4 one (mapped, compatible, translated, NAT64, 6to4, Teredo) only if
    the IPv4 address it carries is public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global and not ip.is_multicast and not any(ip in block for block in _NOT_PUBLIC_V4)
    carried = _carried_ipv4(ip)
    if carried:
        return all(is_public(str(inner)) for inner in carried)
    return ip in _GLOBAL_UNICAST_V6 and ip.is_global and not any(ip in block for block in _NOT_PUBLIC_V6)


def _carried_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    if ip.teredo:
        return ip.teredo  # the server, and the client (its bits inverted in the low 32)
    if ip.sixtofour:
        return (ip.sixtofour,)
    if any(ip in block for block in _CARRIES_IPV4_LOW):
        return (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF),)
    return ()


# --- the URL ----------------------------------------------------------------------------------


class Target(NamedTuple):
    """One URL this server may fetch, and the checked address to connect to."""

    scheme: str
    host: str  # ASCII (IDNA), no brackets
    port: int
    explicit_port: bool
    path: str  # path and query, as sent in the request line
    family: int
    address: tuple  # the socket address that was checked

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host


_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_PRINTABLE = string.punctuation  # what the path keeps as it is; other characters are percent-encoded


def target(name: str, url: str, allow_private: bool = False) -> Target:
    """The URL's parts, if this server may fetch it, with the public address its host resolves to;
    otherwise one InputError sentence naming the input. allow_private (FASTSD_ALLOW_PRIVATE_URLS,
    tests only): any address, http too."""
    url = url.strip()
    if _CONTROL_OR_SPACE.search(url):
        raise InputError(
            f"{name} must be a URL without spaces or control characters (write a space as %20).", field=name
        )
    bad_port = InputError(f"{name}: the port in the URL must be a number from 1 to 65535.", field=name)
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [ of an IPv6 address: not repeated, it may hold a password
        raise InputError(f"{name} is not a valid URL.", field=name) from None
    try:
        port = parts.port
    except ValueError:
        raise bad_port from None
    if "@" in parts.netloc:  # before anything repeats the URL: it may hold a password
        raise InputError(f"{name} must be a URL without a user name or password (user:password@host).", field=name)
    allowed = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise InputError(f"{name} must be an https URL, got {url[:100]!r}.", field=name)
    if port == 0:
        raise bad_port
    host = _ascii_host(name, parts.hostname)
    port = port or (443 if parts.scheme == "https" else 80)
    family, address = _public_address(name, host, port, allow_private)
    path = quote(parts.path or "/", safe=_PRINTABLE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PRINTABLE)
    return Target(parts.scheme, host, port, parts.port is not None, path, family, address)


def _ascii_host(name: str, host: str) -> str:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return host
    except ValueError:
        pass
    invalid = InputError(
        f"{name}: the host in the URL is not a valid host name (dot-separated labels of 1 to 63 letters, digits "
        "or hyphens).",
        field=name,
    )
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise invalid from None
    if len(ascii_host) > 253 or not _HOST_NAME.fullmatch(ascii_host):
        raise invalid
    return ascii_host


def _public_address(name: str, host: str, port: int, allow_private: bool) -> tuple[int, tuple]:
    """The first address host resolves to, if every address it resolves to is public."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InputError(f"{name}: the host {host[:100]} could not be resolved.", field=name) from None
    if not allow_private:
        for *_, address in found:
            if not is_public(str(address[0])):
                raise InputError(
                    f"{name}: {host[:100]} resolves to a non-public address ({address[0]}); "
                    "only public https URLs are fetched.",
                    field=name,
                )
    family, *_, address = found[0]
    return family, address


def check(name: str, url: str, allow_private: bool = False) -> None:
    """Raise the sentence fetch would raise before connecting: for a file cached from url earlier,
    which must be served only where it could be fetched now."""
    target(name, url, allow_private)


# --- the exchange -------------------------------------------------------------------------------


class _Bounded(socket.socket):
    """A socket whose every read waits at most `idle` seconds and never past `deadline`: a sender
    trickling a byte at a time meets the deadline wherever it trickles (headers or body)."""

    deadline = math.inf
    idle: float | None = None

    def arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the deadline passed")
        self.settimeout(left if self.idle is None else min(self.idle, left))

    def recv_into(self, *args, **kwargs):
        self.arm()
        return super().recv_into(*args, **kwargs)


class _BoundedSocket(_Bounded):
    pass


class _BoundedTLSSocket(_Bounded, ssl.SSLSocket):
    pass


def _request(connection: http.client.HTTPConnection, hop: Target, deadline: float) -> http.client.HTTPResponse:
    sock = connection.sock = _BoundedSocket(hop.family, socket.SOCK_STREAM)  # closed with the connection
    sock.deadline, sock.idle = deadline, connection.timeout
    sock.arm()
    sock.connect(hop.address)  # the address that was checked, not a fresh lookup
    if hop.scheme == "https":
        context = ssl.create_default_context()
        context.sslsocket_class = _BoundedTLSSocket
        sock.arm()  # the handshake, however many reads it takes, ends within this one timeout
        tls = context.wrap_socket(sock, server_hostname=hop.host)
        assert isinstance(tls, _BoundedTLSSocket)
        tls.deadline, tls.idle = deadline, connection.timeout
        connection.sock = tls
    connection.request("GET", hop.path, headers={"Host": hop.host_header, "User-Agent": "fastsd"})
    return connection.getresponse()


def fetch(
    name: str,
    url: str,
    destination: Path,
    max_bytes: int,
    timeout: float = 30,
    deadline_s: float = 300,
    not_found: str | None = None,
    allow_private: bool = False,
) -> Path:
    """Download url to destination; every failure is one InputError sentence naming the input
    (not_found: the sentence for HTTP 401 and 404, where the server's status alone says little)."""
    deadline = time.monotonic() + deadline_s
    too_long = InputError(
        f"{name} took too long to download; the limit is the deployment's ({deadline_s:g} s).", field=name
    )
    for _ in range(MAX_REDIRECTS + 1):
        hop = target(name, url, allow_private)
        if time.monotonic() > deadline:
            raise too_long
        connection = http.client.HTTPConnection(hop.host, hop.port, timeout=timeout)
        try:
            response = _request(connection, hop, deadline)
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise InputError(f"{name}: {hop.host} redirected without a location.", field=name)
                url = urljoin(url, location)
                continue
            if response.status in (401, 404) and not_found:
                raise InputError(not_found, field=name)
            if response.status != 200:
                raise InputError(
                    f"{name} could not be fetched: {hop.host} answered HTTP {response.status}.", field=name
                )
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(_too_large(name, max_bytes, f"the file is {int(length) / 2**20:.1f} MiB"), field=name)
            return _stream(name, response, destination, max_bytes, deadline, too_long)
        except (OSError, http.client.HTTPException) as error:
            if getattr(error, "filename", None):  # this machine's files (the cache folder), not the sender
                raise
            if time.monotonic() >= deadline:
                raise too_long from None
            # One sentence for refused, reset, TLS failures, timeouts and non-HTTP answers alike.
            raise InputError(f"{name} could not be fetched from {hop.host}: could not connect.", field=name) from None
        finally:
            connection.close()
    raise InputError(f"{name}: more than {MAX_REDIRECTS} redirects.", field=name)


def _too_large(name: str, max_bytes: int, found: str) -> str:
    return f"{name} must be at most {max_bytes / 2**20:g} MiB; {found}."


def _stream(name: str, response, destination: Path, max_bytes: int, deadline: float, too_long: InputError) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.partial")
    received = 0
    try:
        with open(partial, "wb") as out:
            # read1 returns what has arrived; each read ends by the deadline (_Bounded).
            while chunk := response.read1(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise InputError(_too_large(name, max_bytes, "the download went past it"), field=name)
                if time.monotonic() > deadline:
                    raise too_long
                try:
                    out.write(chunk)
                except OSError as error:  # this machine's disk, not the sender: not the user's input
                    raise RuntimeError(f"writing {partial} failed: {error}") from error
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination
