"""Fetching a file a stranger names (a LoRA URL), without letting the request reach where it should not.

- https only; the host must resolve to public addresses only (no loopback, private, link-local,
  multicast, reserved or cloud metadata addresses), checked after resolution, and the connection
  goes to the address that was checked (a second lookup cannot swap it: DNS rebinding). Every
  redirect is checked the same way, up to MAX_REDIRECTS.
- A size cap (the Content-Length first, then the bytes as they come), a connect/read timeout and a
  total deadline, so a trickling sender cannot hold a slot.
- The file is written under a temporary name and renamed only when complete: a partial download
  is never used.

FASTSD_ALLOW_PRIVATE_URLS=1 lifts the address rule (and allows http) for tests that serve files
from a loopback server. It is off by default and must stay off on a public deployment.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
import uuid
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from .errors import InputError

ALLOW_PRIVATE_ENV = "FASTSD_ALLOW_PRIVATE_URLS"
MAX_REDIRECTS = 5
CHUNK = 1 << 16


def private_urls_allowed() -> bool:
    return os.environ.get(ALLOW_PRIVATE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(address: str) -> bool:
    """Globally routable unicast, and so is any IPv4 address carried inside an IPv6 one (mapped,
    NAT64, 6to4): ::ffff:127.0.0.1 or 64:ff9b::a00:1 would reach this machine's own networks."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public(str(inner))
    return True


def _public_address(name: str, host: str, port: int) -> str:
    """The first address host resolves to, if every address it resolves to is public."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InputError(f"{name}: the host {host} could not be resolved.") from None
    addresses = [info[4][0] for info in found]
    if not private_urls_allowed():
        for address in addresses:
            if not is_public(address):
                raise InputError(
                    f"{name}: {host} resolves to a non-public address ({address}); only public https URLs are fetched."
                )
    return addresses[0]


def _open(name: str, url: str, timeout: float) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    parts = urlsplit(url)
    allowed = ("https", "http") if private_urls_allowed() else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise InputError(f"{name} must be an https URL, got {url[:100]!r}.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _public_address(name, parts.hostname, port)
    sock = socket.create_connection((address, port), timeout=timeout)
    if parts.scheme == "https":
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
    connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    connection.sock = sock  # connected to the address that was checked, not to a fresh lookup
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    connection.request("GET", path, headers={"Host": parts.netloc, "User-Agent": "fastsd"})
    return connection.getresponse(), connection


def fetch(
    name: str,
    url: str,
    destination: Path,
    max_bytes: int,
    timeout: float = 30,
    deadline_s: float = 300,
    not_found: str | None = None,
) -> Path:
    """Download url to destination; every failure is one InputError sentence naming the input
    (not_found: the sentence for HTTP 401 and 404, where the server's status alone says little)."""
    deadline = time.monotonic() + deadline_s
    for _ in range(MAX_REDIRECTS + 1):
        connection = None
        try:
            response, connection = _open(name, url, timeout)
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise InputError(f"{name}: {_host(url)} redirected without a location.")
                url = urljoin(url, location)
                continue
            if response.status in (401, 404) and not_found:
                raise InputError(not_found)
            if response.status != 200:
                raise InputError(f"{name} could not be fetched: {_host(url)} answered HTTP {response.status}.")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(_too_large(name, max_bytes, f"the file is {int(length) / 2**20:.1f} MiB"))
            return _stream(name, response, destination, max_bytes, deadline)
        except (OSError, http.client.HTTPException) as error:
            reason = f"{type(error).__name__}: {error}"
            raise InputError(f"{name} could not be fetched from {_host(url)} ({reason}).") from None
        finally:
            if connection is not None:
                connection.close()
    raise InputError(f"{name}: more than {MAX_REDIRECTS} redirects.")


def _too_large(name: str, max_bytes: int, found: str) -> str:
    return f"{name} must be at most {max_bytes / 2**20:g} MiB; {found}."


def _stream(name: str, response, destination: Path, max_bytes: int, deadline: float) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.partial")
    received = 0
    try:
        with open(partial, "wb") as out:
            # read1 returns what has arrived: a trickling sender meets the deadline within one chunk.
            while chunk := response.read1(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise InputError(_too_large(name, max_bytes, "the download went past it"))
                if time.monotonic() > deadline:
                    raise InputError(f"{name} took too long to download; the limit is the deployment's.")
                out.write(chunk)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def _host(url: str) -> str:
    return urlsplit(url).hostname or "the server"
