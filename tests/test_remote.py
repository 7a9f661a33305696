"""What the server fetches for a stranger (fastsd.loras.remote): which addresses are public, the URL rules,
one deadline for the whole exchange, and error sentences that name the input and tell nothing of
the network. In process against loopback servers; then the same rules through the real Cog server,
which applies them to a LoRA reference before its disk cache."""

from __future__ import annotations

import ipaddress
import re
import select
import socket
import socketserver
import struct
import threading
import time

import pytest

from fastsd import variants
from fastsd.errors import InputError
from fastsd.loras import references as loras
from fastsd.loras import remote
from fastsd.settings import Settings
from fastsd_testing.cog_server import data_uri, ready_server
from fastsd_testing.loopback import LoopbackServer, reply
from fastsd_testing.user_loras import FileServer, write_user_lora

NAME = "lora_weights"


def fetch(*args, **kwargs):
    """remote.fetch as a deployment with these settings calls it (FASTSD_ALLOW_PRIVATE_URLS)."""
    return remote.fetch(*args, allow_private=Settings.from_environment().allow_private_urls, **kwargs)


@pytest.fixture
def strict(monkeypatch):
    """The address rule on, as on any deployment."""
    monkeypatch.delenv(remote.ALLOW_PRIVATE_ENV, raising=False)


@pytest.fixture
def private_urls(monkeypatch):
    """The rule lifted, to reach the loopback servers below."""
    monkeypatch.setenv(remote.ALLOW_PRIVATE_ENV, "1")


def teredo(server: str, client: str) -> str:
    """The Teredo address 2001:0:<server>:<flags>:<port>:<client>, the client's bits inverted."""
    client_bits = int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF
    return str(
        ipaddress.IPv6Address(
            (0x2001 << 112) | (int(ipaddress.IPv4Address(server)) << 64) | (0x800063BF << 32) | client_bits
        )
    )


def test_the_teredo_addresses_below_carry_what_they_say():
    assert ipaddress.ip_address(teredo("65.54.227.120", "8.8.8.8")).teredo == (
        ipaddress.IPv4Address("65.54.227.120"),
        ipaddress.IPv4Address("8.8.8.8"),
    )


# --- which addresses are public ---------------------------------------------------------------

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",  # IPv4-mapped, of a public address
    "::8.8.8.8",  # IPv4-compatible
    "::ffff:0:8.8.8.8",  # IPv4-translated
    "64:ff9b::808:808",  # NAT64
    "2002:808:808::1",  # 6to4
    teredo("65.54.227.120", "8.8.8.8"),
]

NOT_PUBLIC = [
    ("0.0.0.0", "this network"),
    ("0.1.2.3", "this network"),
    ("10.0.0.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("169.254.169.254", "link-local: cloud metadata"),
    ("172.16.0.1", "private"),
    ("192.0.0.9", "IETF protocol assignments"),
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "6to4 relay anycast, deprecated"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("::7f00:1", "IPv4-compatible loopback"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::a9fe:a9fe", "IPv4-compatible metadata"),
    ("::10.0.0.1", "IPv4-compatible private"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:a9fe:a9fe", "IPv4-mapped metadata"),
    ("::ffff:192.168.0.1", "IPv4-mapped private"),
    ("::ffff:0:7f00:1", "IPv4-translated loopback"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated metadata"),
    ("64:ff9b::7f00:1", "NAT64 loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64 metadata"),
    ("64:ff9b:1::7f00:1", "local-use NAT64"),
    ("64:ff9b:1::808:808", "local-use NAT64: what it reaches is the operator's choice"),
    ("2002:7f00:1::", "6to4 loopback"),
    ("2002:a9fe:a9fe::1", "6to4 metadata"),
    ("2002:c0a8:101::1", "6to4 private"),
    (teredo("65.54.227.120", "127.0.0.1"), "Teredo, loopback client"),
    (teredo("65.54.227.120", "169.254.169.254"), "Teredo, metadata client"),
    (teredo("169.254.169.254", "8.8.8.8"), "Teredo, metadata server"),
    (teredo("10.0.0.1", "8.8.8.8"), "Teredo, private server"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local with a zone"),
    ("fec0::1", "site-local, deprecated"),
    ("fc00::1", "unique local"),
    ("fd00:ec2::254", "unique local: cloud metadata over IPv6"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "global multicast"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "benchmarking"),
    ("2001:10::1", "ORCHID"),
    ("2001:20::1", "ORCHIDv2"),
    ("3ffe::1", "6bone, returned"),
    ("100::1", "discard-only"),
    ("5f00::1", "SRv6 segment identifiers"),
    ("4000::1", "outside global unicast"),
    ("::1:0:0:1", "reserved"),
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert remote.is_public(address)


@pytest.mark.parametrize("address, kind", NOT_PUBLIC, ids=[f"{a} ({k})" for a, k in NOT_PUBLIC])
def test_every_other_address_is_refused(address, kind):
    assert not remote.is_public(address)


class Listener:
    """A TCP listener on a loopback address that answers nothing: it shows whether anyone connected."""

    def __init__(self, host: str = "127.0.0.1"):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.bind((host, 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]

    def was_connected(self) -> bool:
        """A completed connection waits in the backlog: readable at once, no waiting needed."""
        return bool(select.select([self.socket], [], [], 0)[0])

    def close(self):
        self.socket.close()


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "localhost", "2130706433", "0x7f000001", "127.1", "[::1]"],
)
def test_a_host_naming_this_machine_in_any_form_is_refused_before_connecting(strict, host, tmp_path):
    listener = Listener("::1" if host == "[::1]" else "127.0.0.1")
    try:
        with pytest.raises(InputError, match=rf"^{NAME}: \S+ resolves to a non-public address \(\S+\)"):
            fetch(NAME, f"https://{host}:{listener.port}/x.safetensors", tmp_path / "x", 1 << 20)
        assert not listener.was_connected()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "host",
    ["169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518", "[::ffff:a9fe:a9fe]",
     "[::a9fe:a9fe]", "[::ffff:0:a9fe:a9fe]", "[64:ff9b::a9fe:a9fe]", "[2002:a9fe:a9fe::]"],
)  # fmt: skip
def test_the_metadata_address_in_any_form_is_refused(strict, host, tmp_path):
    with pytest.raises(InputError, match=r"resolves to a non-public address"):
        fetch(NAME, f"https://{host}/latest/meta-data/", tmp_path / "x", 1 << 20)


# --- the URL ----------------------------------------------------------------------------------

LONG_LABEL = "a" * 100_000
MANY_LABELS = ".".join(["a"] * 50_000)  # 100 KB of valid labels: longer than any host name

REFUSED_URLS = [
    (f"https://{LONG_LABEL}/x", r"the host in the URL is not a valid host name"),
    (f"https://{MANY_LABELS}/x", r"the host in the URL is not a valid host name"),
    ("https://a..b/x", r"the host in the URL is not a valid host name"),
    ("https://-/x", r"the host in the URL is not a valid host name"),
    ("https://ex!ample.com/x", r"the host in the URL is not a valid host name"),
    ("https://host:99999/x", r"the port in the URL must be a number from 1 to 65535"),
    ("https://host:0/x", r"the port in the URL must be a number from 1 to 65535"),
    ("https://host:-1/x", r"the port in the URL must be a number from 1 to 65535"),
    ("https://host:https/x", r"the port in the URL must be a number from 1 to 65535"),
    ("https://[::1/x", r"is not a valid URL\."),
    ("https://exa mple.com/x", r"must be a URL without spaces or control characters"),
    ("https://example.com/a b.safetensors", r"must be a URL without spaces or control characters"),
    ("https://example.com/a\x00b", r"must be a URL without spaces or control characters"),
    ("https://user:secret@example.com/x", r"must be a URL without a user name or password"),
    ("https://token@example.com/x", r"must be a URL without a user name or password"),
    ("http://user:secret@example.com/x", r"must be a URL without a user name or password"),
    ("https://user:secret@[::1/x", r"is not a valid URL\."),
    ("http://example.com/x", r"must be an https URL, got 'http://example.com/x'"),
    ("ftp://example.com/x", r"must be an https URL"),
    ("file:///etc/passwd", r"must be an https URL"),
    ("https:///x", r"must be an https URL"),
    ("example.com/x.safetensors", r"must be an https URL"),
]


@pytest.mark.parametrize("url, expected", REFUSED_URLS, ids=[url[:40] for url, _ in REFUSED_URLS])
def test_a_bad_url_is_refused_with_one_sentence_naming_the_input(strict, url, expected, tmp_path):
    with pytest.raises(InputError) as refused:
        fetch(NAME, url, tmp_path / "x", 1 << 20)
    message = str(refused.value)
    assert message.startswith(NAME) and re.search(expected, message), message
    assert message.endswith(".") and "\n" not in message and len(message) < 300, message
    assert not re.search(r"[A-Z]\w+Error|codec|idna", message), message
    assert "secret" not in message and "token" not in message
    assert not (tmp_path / "x").exists()


class RecordingServer(LoopbackServer):
    """Answers every GET with a small file and keeps each request's line and headers."""

    def __init__(self, host: str):
        self.seen: list[tuple[str, dict]] = []
        super().__init__(host)

    def respond(self, handler, send_body: bool) -> None:
        self.seen.append((handler.path, dict(handler.headers)))
        reply(handler, 200, b"hello", send_body=send_body)


@pytest.mark.parametrize("host, shown", [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_the_host_header_is_the_host_and_port_only(private_urls, host, shown, tmp_path):
    server = RecordingServer(host)
    try:
        fetch(NAME, f"http://{shown}:{server.port}/dir/ü.safetensors?v=1", tmp_path / "x", 1 << 20)
        with pytest.raises(InputError, match="without a user name or password"):
            fetch(NAME, f"http://user:secret@{shown}:{server.port}/other", tmp_path / "y", 1 << 20)
    finally:
        server.close()
    assert (tmp_path / "x").read_bytes() == b"hello"
    assert len(server.seen) == 1  # the URL with a password reached nothing
    path, headers = server.seen[0]
    assert headers["Host"] == f"{shown}:{server.port}"
    assert path == "/dir/%C3%BC.safetensors?v=1"  # non-ASCII percent-encoded, as browsers send it


# --- one deadline for the whole exchange --------------------------------------------------------


class TrickleServer(socketserver.ThreadingTCPServer):
    """Sends the same pieces on every connection, `gap` seconds apart, then closes: bounded, it
    stops by itself (or as soon as the client has gone). `reached_end` counts the connections it
    got to the last piece of, counted before sending it: no client can have read it earlier."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, pieces: list[bytes], gap: float):
        self.pieces, self.gap = pieces, gap
        self.connections = self.reached_end = 0
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                server.connections += 1
                try:
                    for index, piece in enumerate(server.pieces):
                        if index == len(server.pieces) - 1:
                            server.reached_end += 1
                        self.request.sendall(piece)
                        time.sleep(server.gap)
                except OSError:
                    pass  # the client gave up

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


GAP = 0.2  # between pieces: far below the idle timeout, so only the deadline can end a trickle
HEADER_LINES = [b"HTTP/1.1 200 OK\r\n", *(b"X-Pad-%d: x\r\n" % n for n in range(50)), b"Content-Length: 1\r\n\r\nx"]
SLOW_BODY = [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", *([b"x"] * 50)]
TLS_RECORD = [b"\x16\x03\x03\x40\x00", *([b"\x00"] * 50)]  # a handshake record promising 16 KiB, 1 byte at a time
SLOW_REDIRECT = [
    b"HTTP/1.1 302 Found\r\n",
    b"X-Pad: x\r\n",
    b"X-Pad: y\r\n",
    b"Location: /again\r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize(
    "pieces, scheme",
    [(HEADER_LINES, "http"), (SLOW_BODY, "http"), (TLS_RECORD, "https")],
    ids=["headers", "body", "tls-handshake"],
)
def test_a_trickling_sender_meets_the_deadline_wherever_it_trickles(private_urls, pieces, scheme, tmp_path):
    server = TrickleServer(pieces, GAP)  # 10 s to send it all
    try:
        url = server.url.replace("http", scheme, 1) + "/x.safetensors"
        with pytest.raises(InputError, match=rf"^{NAME} took too long to download; the limit is the deployment's"):
            fetch(NAME, url, tmp_path / "x", 1 << 20, timeout=5, deadline_s=1)
        assert server.reached_end == 0  # given up at the deadline, long before the sender was done
    finally:
        server.close()
    assert not (tmp_path / "x").exists()


def test_the_deadline_covers_every_redirect(private_urls, tmp_path):
    server = TrickleServer(SLOW_REDIRECT, GAP)  # each hop's headers take 0.6 s
    try:
        with pytest.raises(InputError, match=rf"^{NAME} took too long to download"):
            fetch(NAME, server.url + "/start", tmp_path / "x", 1 << 20, timeout=5, deadline_s=1)
        assert server.connections <= 2
    finally:
        server.close()


# --- a failed connection reads the same whatever the cause --------------------------------------


class OneShotServer:
    """Accepts connections on 127.0.0.1 and does `behave(connection)` with each, on its own thread."""

    def __init__(self, behave):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.behave = behave
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection):
        with connection:
            try:
                self.behave(connection)
            except OSError:
                pass

    def close(self):
        self.socket.close()


def _reset(connection):
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def _not_http(connection):
    connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


def _silent(connection):
    connection.settimeout(30)
    connection.recv(65536)  # the request
    connection.recv(1)  # returns when the client has given up and closed


def _close(connection):
    pass


@pytest.fixture
def closed_port():
    """A bound port nobody listens on: connecting is refused, and no other test can take it."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.mark.parametrize("cause", ["refused", "reset", "closed", "not-http", "idle-timeout", "tls-failure"])
def test_every_failed_connection_gives_the_same_sentence(private_urls, cause, closed_port, tmp_path):
    behaviours = {"reset": _reset, "closed": _close, "not-http": _not_http, "idle-timeout": _silent}
    server = OneShotServer(behaviours[cause]) if cause in behaviours else None
    files = FileServer({"/x": b"hello"}) if cause == "tls-failure" else None
    try:
        if server:
            url = f"http://127.0.0.1:{server.port}/x"
        elif files:
            url = files.url("/x").replace("http://", "https://")  # TLS to a plain HTTP server
        else:
            url = f"http://127.0.0.1:{closed_port}/x"
        with pytest.raises(InputError) as failed:
            fetch(NAME, url, tmp_path / "x", 1 << 20, timeout=0.5, deadline_s=60)
    finally:
        for running in (server, files):
            if running:
                running.close()
    assert str(failed.value) == f"{NAME} could not be fetched from 127.0.0.1: could not connect."


# --- through the Cog server: the rules before the LoRA cache --------------------------------------


@pytest.fixture(scope="module")
def lora_files(weights_root, tmp_path_factory):
    model = weights_root / "weights" / variants.VARIANTS["sd15-lcm"].model
    lora = write_user_lora(model, tmp_path_factory.mktemp("lora") / "style.safetensors")
    with FileServer({"/style.safetensors": lora.read_bytes()}) as server:
        yield server


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-lora-cache")


@pytest.fixture(scope="module")
def cog_without_the_setting(weights_root, shared_cache, tmp_path_factory):
    """A deployment as strangers call it: no FASTSD_ALLOW_PRIVATE_URLS, no ControlNet."""
    environment = {
        "FASTSD_VARIANT": "sd15-lcm",
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_LORA_CACHE": str(shared_cache),
        "FASTSD_ALLOW_PRIVATE_URLS": "",
    }
    yield from ready_server(environment, tmp_path_factory.mktemp("logs") / "strict.log")


SMALL = dict(prompt="a lighthouse", seed=3, width=64, height=64, num_inference_steps=2)


def failure(cog, **inputs) -> str:
    response = cog.predict(**SMALL, **inputs)
    assert response["status"] == "failed", "expected the prediction to fail"
    assert cog.is_ready_again()
    return response["error"]


def test_a_lora_cached_where_private_urls_were_allowed_is_refused_where_they_are_not(
    cog_without_the_setting, lora_files, shared_cache, monkeypatch
):
    url = lora_files.url("/style.safetensors")
    with monkeypatch.context() as allowed:  # a server with the setting fetched it into the shared cache
        allowed.setenv(remote.ALLOW_PRIVATE_ENV, "1")
        allowed.setenv("FASTSD_LORA_CACHE", str(shared_cache))
        assert loras.resolve(NAME, url, loras.Rules.from_settings(Settings.from_environment())).path.is_file()
    fetched = dict(lora_files.requests)
    error = failure(cog_without_the_setting, lora_weights=url)
    assert error.endswith(f"{NAME} must be an https URL, got {url!r}."), error  # what a fresh cache says
    assert lora_files.requests == fetched


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("https://[::7f00:1]/x.safetensors", r"::7f00:1 resolves to a non-public address"),
        ("https://[::127.0.0.1]/x.safetensors", r"resolves to a non-public address"),
        ("https://[::ffff:0:7f00:1]/x.safetensors", r"resolves to a non-public address"),
        ("https://[64:ff9b:1::7f00:1]/x.safetensors", r"resolves to a non-public address"),
        ("https://[fec0::1]/x.safetensors", r"resolves to a non-public address"),
        ("https://[::a9fe:a9fe]/latest/meta-data/", r"resolves to a non-public address"),
        ("https://user:secret@example.com/x.safetensors", r"must be a URL without a user name or password"),
        ("https://example.com:99999/x.safetensors", r"the port in the URL must be a number from 1 to 65535"),
        ("https://a..b/x.safetensors", r"the host in the URL is not a valid host name"),
        (f"https://{LONG_LABEL}/x.safetensors", r"the host in the URL is not a valid host name"),
    ],
    ids=lambda value: value[:40],
)
def test_bad_lora_urls_fail_with_one_sentence_through_the_server(cog_without_the_setting, reference, expected):
    error = failure(cog_without_the_setting, lora_weights=reference)
    sentence = error.rsplit("InputError: ", 1)[-1]
    assert sentence.startswith(NAME) and re.search(expected, sentence), error
    assert "secret" not in error and "Traceback" not in error and len(sentence) < 300


def test_a_control_image_is_not_decoded_where_no_controlnet_is_served(cog_without_the_setting):
    """Cog has downloaded it (unavoidable); fastsd refuses before opening it: bytes that are no image
    give the ControlNet sentence, not the unreadable-image one."""
    junk = data_uri(b"not an image at all", "image/png")
    error = failure(cog_without_the_setting, control_image=junk, controlnet="canny")
    assert "controlnet canny is not served by this deployment (it serves: none)" in error, error
    error = failure(cog_without_the_setting, control_image=junk)
    assert "control_image needs controlnet" in error, error
