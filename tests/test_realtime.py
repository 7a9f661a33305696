"""The realtime server's websocket protocol (docs/realtime.md) on the tiny sd-turbo: newest input
wins, bad input and limits answered, disconnects cancel, clients batched, the Cog HTTP backend.

A slow model is made deterministic with a gate: the real engine, held before each pipeline call
until the test opens it, so "frames arrive while the model is busy" never depends on timing.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient
from test_safety import checked_root

from fastsd import variants
from fastsd.batching import Batcher, Canceled
from fastsd.engine import Engine
from fastsd.realtime.app import create_app
from fastsd.realtime.backend import CogBackend, EngineBackend, Passes
from fastsd.realtime.settings import Access, Limits
from fastsd_testing import random_models
from fastsd_testing.cog_server import ready_server
from fastsd_testing.helpers import load_engine

WS = "ws://127.0.0.1/ws"  # a loopback name: the app answers only those on a loopback address
SMALL = {"type": "params", "prompt": "a kite over the sea", "width": 64, "height": 64, "strength": 0.5}


def jpeg(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Gate:
    """Holds every pipeline call of the real engine until opened."""

    def __init__(self, engine: Engine):
        self.opened = threading.Event()
        self.opened.set()
        self._engine, self._real = engine, engine.generate_batch

        def held(*args, **kwargs):
            assert self.opened.wait(120), "the gate was never opened"
            return self._real(*args, **kwargs)

        engine.generate_batch = held

    def hold(self):
        self.opened.clear()

    def open(self):
        self.opened.set()

    def remove(self):
        self.opened.set()
        self._engine.generate_batch = self._real


@pytest.fixture(scope="module")
def engine(weights_root):
    return load_engine(weights_root, "sd-turbo")


@pytest.fixture
def gate(engine):
    made = Gate(engine)
    yield made
    made.remove()


def serve(engine, limits: Limits | None = None, access: Access | None = None) -> TestClient:
    """A client of a fresh app (its own batcher), on a loopback name the app answers."""
    backend = EngineBackend(engine, Batcher(engine))
    return TestClient(create_app(backend, limits, access), base_url="http://127.0.0.1")


def receive(ws) -> dict:
    """The next message; a result comes with its image (the binary message right after it)."""
    message = json.loads(ws.receive_text())
    if message["type"] == "result":
        message["image"] = Image.open(io.BytesIO(ws.receive_bytes()))
        message["image"].load()
    return message


def until(ws, kind: str, seen: list | None = None) -> dict:
    """Messages up to the first of a kind; the ones before go into seen."""
    while (message := receive(ws))["type"] != kind:
        if seen is not None:
            seen.append(message)
    return message


def connect(client: TestClient, **headers):
    ws = client.websocket_connect(WS, headers=headers)
    session = ws.__enter__()
    hello = receive(session)
    assert hello["type"] == "ready", hello
    return ws, session, hello


def wait_for(condition, what: str, timeout: float = 60):
    """Polls a condition of the server's state (never a timing assumption: it waits for the state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def stats(ws) -> dict:
    ws.send_json({"type": "stats"})
    return until(ws, "stats")


def latest(ws) -> dict:
    """The result of the newest input sent so far (earlier results are passed over)."""
    ws.send_json({"type": "stats"})
    seen = []
    newest = until(ws, "stats", seen)["inputs"]
    while not (found := [m for m in seen if m["type"] == "result" and m["input"] == newest]):
        seen.append(receive(ws))
    return found[0]


def test_twenty_frames_at_once_to_a_busy_model_give_fewer_generations_ending_on_the_last(engine, gate):
    with serve(engine) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        gate.hold()
        ws.send_json(SMALL)  # input 1 (text-to-image)
        for i in range(20):  # inputs 2..21, each a different frame
            ws.send_bytes(jpeg((10 * i, 200 - 5 * i, 90)))
        received = stats(ws)  # answered after the server has read every frame before it
        assert received["inputs"] == 21
        gate.open()
        seen = []
        while not seen or seen[-1]["input"] != 21:
            seen.append(until(ws, "result"))
        after = stats(ws)
        assert len(seen) < 20 and after["generations"] == len(seen)  # at most one in flight + one pending
        assert after["replaced"] >= 18 and not after["pending"]
        assert seen[-1]["image"].format == "JPEG" and seen[-1]["image"].size == (64, 64)
        assert all(result["seed"] == seen[0]["seed"] for result in seen)  # one seed per session
        assert seen[-1]["latency_ms"] > 0 and seen[-1]["batch_size"] == 1


def test_the_fast_pass_and_the_refined_one_differ_as_the_variant_says(engine):
    passes = Passes.for_variant(engine.variant, engine.pipelines.vae_choices)
    # sd-turbo: 1 step with the tiny VAE by default, so the refined pass decodes with the full VAE.
    assert (passes.fast_steps, passes.fast_vae, passes.refined_steps, passes.refined_vae) == (1, "tiny", 1, "full")
    lcm = Passes.for_variant(variants.VARIANTS["lcm-dreamshaper"])
    assert (lcm.fast_steps, lcm.fast_vae, lcm.refined_steps, lcm.refined_vae) == (2, "tiny", 4, "full")
    with serve(engine) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send_json(SMALL)
        fast = until(ws, "result")
        ws.send_json({"type": "refine"})
        refined = until(ws, "result")
        assert (fast["pass"], fast["vae"]) == ("fast", "tiny")
        assert (refined["pass"], refined["vae"], refined["seed"]) == ("refined", "full", fast["seed"])
        ws.send_json({"type": "refine"})  # nothing changed: skipped, and said so
        assert until(ws, "unchanged")["input"] == 3


def test_bad_frames_and_parameters_are_answered_naming_them_and_the_session_goes_on(engine):
    limits = Limits(max_frame_bytes=20_000, max_frame_pixels=96 * 96)
    with serve(engine, limits) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send_json(SMALL)
        ws.send_bytes(jpeg((200, 30, 30)))
        first = latest(ws)
        shown = first["image"].tobytes()

        cases = [
            (b"not an image at all", "image", "could not be read"),
            (b"\xff\xd8" + bytes(30_000), "image", "at most 20000 bytes"),
            (jpeg((0, 0, 0), (128, 128)), "image", "at most 9216 pixels"),
            ({"type": "params", "strength": 5}, "strength", "strength must be between 0 and 1, got 5."),
            ({"type": "params", "num_inference_steps": 0}, "num_inference_steps", "between 1 and"),
            ({"type": "params", "width": 65}, "width", "multiple of 8"),
            ({"type": "params", "output_format": "png"}, "output_format", "jpg or webp"),
            ({"type": "params", "colour": "red"}, "colour", "not a parameter"),
            ({"type": "dance"}, "type", "params, refine or stats"),
            ("{not json", "message", "JSON object"),
            # What a probe sent (each once dropped the connection or answered a Python error):
            (png_header(60000, 60000), "image", "at most 9216 pixels"),
            ({"type": "params", "output_format": ["jpg"]}, "output_format", "jpg or webp"),
            ('{"type": "params", "seed": ' + "[" * 30000 + "]" * 30000 + "}", "message", "JSON object"),
            ({"type": "params", "strength": 5e-324}, "strength", "strength x num_inference_steps must be at least 1"),
            ('{"type": "params", "strength": NaN}', "strength", "strength must be a finite number, got NaN."),
            ('{"type": "params", "guidance_scale": Infinity}', "guidance_scale", "a finite number, got Infinity."),
            ('{"type": "params", "guidance_scale": 1e309}', "guidance_scale", "a finite number, got 1e309."),
            ({"type": "params", "seed": 10**400}, "seed", "seed must be between 0 and 4294967295, got 100000"),
            ({"type": "params", "num_inference_steps": 10**400}, "num_inference_steps", "(401 digits)"),
        ]
        for sent, field, words in cases:
            if isinstance(sent, bytes):
                ws.send_bytes(sent)
            elif isinstance(sent, dict):
                ws.send_json(sent)
            else:
                ws.send_text(sent)
            error = until(ws, "error")
            assert error["field"] == field and words in error["message"], (sent, error)
        # The refused values went back: the same frame again draws exactly the first image.
        ws.send_bytes(jpeg((20, 200, 30)))
        latest(ws)
        ws.send_bytes(jpeg((200, 30, 30)))
        again = latest(ws)
        assert again["image"].tobytes() == shown


def png_header(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims this size: only decoding it would find the lie."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its checksum
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_first_parameters_without_a_prompt_are_told_the_prompt_is_required(engine):
    with serve(engine) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send_json({"type": "params", "width": 64, "height": 64})
        error = until(ws, "error")
        assert (error["field"], error["message"]) == ("prompt", "prompt is required.")
        ws.send_json(SMALL)
        assert until(ws, "result")["image"].size == (64, 64)


def test_a_safety_withheld_frame_sends_a_notice_and_no_image(weights_root, tmp_path, monkeypatch):
    root = checked_root(weights_root, tmp_path, random_models.FLAG_EVERYTHING, random_models.UNSAFE)
    strict = load_engine(root, "sd-turbo")
    with serve(strict) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send_json(SMALL)
        notice = until(ws, "withheld")
        assert notice["input"] == 1 and "previous one stays" in notice["message"]
        assert stats(ws)["generations"] == 0  # stats came next: no image was sent in between


def test_limits_connections_rate_and_idle_each_say_so(engine):
    with serve(engine, Limits(max_connections=1, max_messages_per_second=0.05)) as client:
        first, ws, _ = connect(client)
        with client.websocket_connect(WS) as second:
            refused = receive(second)
            assert refused["field"] == "connections" and "at most 1 connections" in refused["message"]
        # Two more messages within 20 s of the first: the bucket (1 message, 0.05 a second) is empty.
        ws.send_json(SMALL)
        ws.send_json({"type": "stats"})
        assert until(ws, "error")["field"] == "rate"
        first.__exit__(None, None, None)
    with serve(engine, Limits(idle_timeout=0.3)) as client, client.websocket_connect(WS) as ws:
        assert receive(ws)["type"] == "ready"
        idle = until(ws, "error")
        assert idle["field"] == "idle" and "idle_timeout" in idle["message"]


def test_other_origins_and_missing_tokens_are_refused():
    access = Access(loopback=False, token="s3cret", allowed_origins=("https://paint.example",))
    assert access.refusal({"host": "a:8000", "origin": "https://evil.example"}, {"token": "s3cret"}).startswith(
        "origin https://evil.example"
    )
    assert "token" in access.refusal({"host": "a:8000", "origin": "http://a:8000"}, {"token": "guess"})
    assert access.refusal({"host": "a:8000", "origin": "http://a:8000"}, {"token": "s3cret"}) is None
    assert access.refusal({"host": "a:8000", "origin": "https://paint.example"}, {"token": "s3cret"}) is None
    assert access.refusal({"host": "a:8000", "authorization": "Bearer s3cret"}, {}) is None
    assert access.refusal({"host": "a:8000", "authorization": "bearer s3cret"}, {}) is None  # any case
    assert "token" in access.refusal({"host": "a:8000", "authorization": "s3cret"}, {})  # no scheme: refused
    assert "token" in access.refusal({"host": "a:8000", "authorization": "Basic s3cret"}, {})
    with pytest.raises(ValueError, match="FASTSD_REALTIME_TOKEN"):
        Access.for_host("0.0.0.0", token="")
    assert Access.for_host("127.0.0.1", token="").refusal({"host": "127.0.0.1:8000"}, {}) is None


def test_a_refused_origin_is_told_on_the_socket(engine):
    with serve(engine) as client, client.websocket_connect(WS, headers={"origin": "https://evil.example"}) as ws:
        refused = receive(ws)
        assert refused["field"] == "access" and "origin https://evil.example" in refused["message"]


def served(engine) -> tuple[TestClient, Batcher]:
    backend = EngineBackend(engine, Batcher(engine))
    client = TestClient(create_app(backend), base_url="http://127.0.0.1")
    return client, backend.batcher


def blocker(batcher: Batcher, engine: Engine):
    """A request of another batch key that holds the (gated) model while clients queue behind it."""
    job = batcher.submit(engine.validate(prompt="busy", width=96, height=96, seed=3))
    wait_for(job.future.running, "the blocker to run")
    return job


def test_two_clients_with_one_batch_key_are_served_in_one_call(engine, gate):
    client, batcher = served(engine)
    with client, client.websocket_connect(WS) as a, client.websocket_connect(WS) as b:
        for ws in (a, b):
            assert receive(ws)["type"] == "ready"
        gate.hold()
        held = blocker(batcher, engine)
        for ws, color in ((a, (250, 0, 0)), (b, (0, 0, 250))):
            ws.send_json({**SMALL, "prompt": f"a kite, {color}"})
        wait_for(lambda: all(s.state == "queued" for s in client.app.state.sessions), "both clients to queue")
        gate.open()
        results = [until(ws, "result") for ws in (a, b)]
        assert [r["batch_size"] for r in results] == [2, 2]
        assert held.future.result(timeout=60).batch_size == 1


def test_a_disconnect_cancels_that_clients_queued_and_running_work_only(engine, gate):
    client, batcher = served(engine)
    jobs, real_submit = {}, batcher.submit

    def submit(request):  # the real batcher, its jobs kept by prompt to look at afterwards
        jobs[request.prompt] = real_submit(request)
        return jobs[request.prompt]

    batcher.submit = submit
    sessions = client.app.state.sessions
    with client:
        # Queued: A leaves while its request waits behind the blocker; B, queued too, runs alone.
        gate.hold()
        held = blocker(batcher, engine)
        a_context, a, _ = connect(client)
        with client.websocket_connect(WS) as b:
            assert receive(b)["type"] == "ready"
            a.send_json({**SMALL, "prompt": "queued A"})
            b.send_json({**SMALL, "prompt": "B"})
            wait_for(lambda: len(sessions) == 2 and all(s.state == "queued" for s in sessions), "both to queue")
            a_context.__exit__(None, None, None)
            wait_for(lambda: len(sessions) == 1, "the server to see A go")
            gate.open()
            assert until(b, "result")["batch_size"] == 1  # A's request left the queue
            assert jobs["queued A"].canceled and not jobs["B"].canceled
            held.future.result(timeout=60)

            # Running: A's request is in the model's call when A leaves; the call stops, B goes on.
            gate.hold()
            a_context, a, _ = connect(client)
            a.send_json({**SMALL, "prompt": "running A"})
            wait_for(lambda: "running A" in jobs and jobs["running A"].future.running(), "A's request to run")
            a_context.__exit__(None, None, None)
            wait_for(lambda: len(sessions) == 1, "the server to see A go")
            gate.open()
            with pytest.raises(Canceled):
                jobs["running A"].future.result(timeout=60)
            b.send_bytes(jpeg((1, 2, 3)))
            assert until(b, "result")["input"] == 2


@pytest.fixture(scope="module")
def cog(weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "realtime-backend.log"
    yield from ready_server({"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root)}, log_path)


def test_the_cog_backend_renders_through_the_real_cog_server(cog):
    backend = CogBackend(cog.url, variants.VARIANTS["sd-turbo"])
    with TestClient(create_app(backend), base_url="http://127.0.0.1") as client:
        with client.websocket_connect(WS) as ws:
            hello = receive(ws)
            assert hello["backend"] == "sd-turbo through a Cog server"  # not its address
            ws.send_json({**SMALL, "seed": 11})
            ws.send_bytes(jpeg((200, 30, 30)))
            results = [until(ws, "result")]
            while results[-1]["input"] != 2:
                results.append(until(ws, "result"))
            last = results[-1]
            assert last["seed"] == 11 and last["image"].format == "JPEG" and last["image"].size == (64, 64)
            ws.send_json({"type": "params", "strength": 5})
            error = until(ws, "error")
            assert error["field"] == "strength" and "greater than the maximum of 1" in error["message"]  # the schema
            ws.send_json({"type": "params", "output_format": "webp"})
            assert until(ws, "result")["image"].format == "WEBP"
    assert cog.is_ready_again()


def test_the_one_command_serves_the_page_and_the_socket(weights_root, tmp_path):
    """`python -m fastsd.realtime` as a user starts it, on the tiny sd-turbo."""
    import subprocess
    import sys
    import urllib.request

    from websockets.sync.client import connect as connect_socket

    from fastsd_testing.cog_server import _free_port

    port = _free_port()
    environment = {**os.environ, "FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root)}
    environment.pop("FASTSD_REALTIME_TOKEN", None)
    refused = subprocess.run(
        [sys.executable, "-m", "fastsd.realtime", "--host", "0.0.0.0"], env=environment, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "needs FASTSD_REALTIME_TOKEN" in refused.stderr
    log_path = tmp_path / "realtime.log"
    token, near_miss = "a-long-secret-4f9c2e", "a-long-secret-4f9c2f"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "fastsd.realtime", "--port", str(port), "--max-frame-bytes", "30000"],
            env={**environment, "FASTSD_REALTIME_TOKEN": token},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy():
            assert server.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                    return json.loads(answer.read())["status"] == "ready"
            except OSError:
                return False

        wait_for(healthy, "the server to start", timeout=300)
        with urllib.request.urlopen(f"{base}/?token={token}", timeout=10) as answer:
            assert b'<script src="realtime.js"' in answer.read()
            assert "default-src 'self'" in answer.headers["content-security-policy"]
        with connect_socket(f"ws://127.0.0.1:{port}/ws?token={near_miss}") as ws:
            assert "token is missing or wrong" in json.loads(ws.recv())["message"]
        with connect_socket(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            hello = json.loads(ws.recv())
            assert hello["type"] == "ready" and hello["limits"]["max_frame_bytes"] == 30000, hello
            ws.send(json.dumps(SMALL))
            ws.send(jpeg((9, 99, 199)))
            while (message := json.loads(ws.recv()))["type"] != "result" or message["input"] != 2:
                if message["type"] == "result":
                    ws.recv()
            assert Image.open(io.BytesIO(ws.recv())).size == (64, 64)
    finally:
        server.terminate()
        server.wait(timeout=30)
    logged = log_path.read_text()
    assert "GET /?token=[redacted]" in logged and "/ws?token=[redacted]" in logged, logged[-2000:]
    assert token not in logged and near_miss not in logged  # neither the token nor a guess at it


def test_a_connection_that_never_finishes_its_headers_is_closed(engine, monkeypatch):
    import socket

    from fastsd.realtime import transport
    from fastsd_testing.realtime_server import serving

    monkeypatch.setattr(transport, "HEADER_DEADLINE_S", 0.5)
    backend = EngineBackend(engine, Batcher(engine))
    with serving(create_app(backend)) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server, not by the test's timeout
            assert time.monotonic() - started < 20
        with urllib_get(f"{base}/health") as answer:  # the server goes on
            assert json.loads(answer.read())["status"] == "ready"


def urllib_get(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=10)


def test_clients_are_not_shown_the_backends_address():
    backend = CogBackend("http://10.0.0.7:5000", variants.VARIANTS["sd-turbo"])
    assert "10.0.0.7" not in backend.description and backend.endpoint == "http://10.0.0.7:5000/predictions"


def test_the_image_and_the_package_carry_the_page():
    """The Cog image's build context (.dockerignore) and the package data (pyproject.toml) keep the
    page's files, so `python -m fastsd.realtime` in the image serves them."""
    import tomllib

    from fastsd.realtime.app import STATIC
    from fastsd_testing.helpers import PROJECT_ROOT, dockerignore_excludes

    ignored = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in ignored if line and not line.startswith("#")]
    page = sorted(path.relative_to(PROJECT_ROOT).as_posix() for path in STATIC.iterdir())
    assert page == ["fastsd/realtime/static/index.html", "fastsd/realtime/static/realtime.css",
                    "fastsd/realtime/static/realtime.js"]  # fmt: skip
    for path in [*page, "fastsd/realtime/__main__.py", "fastsd/realtime/app.py"]:
        assert not dockerignore_excludes(patterns, path), path
    setuptools = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fastsd.realtime" in setuptools["packages"]
    shipped = setuptools["package-data"]["fastsd.realtime"]
    assert all(any(Path(name).relative_to("fastsd/realtime").match(glob) for glob in shipped) for name in page)


def test_a_client_that_goes_cancels_its_prediction_on_the_cog_server(cog):
    backend = CogBackend(cog.url, variants.VARIANTS["sd-turbo"])
    slow = {**SMALL, "width": 512, "height": 512, "num_inference_steps": 50, "seed": 12345}
    canceled_before = cog.log_path.read_text().count("Prediction cancelled")
    with TestClient(create_app(backend), base_url="http://127.0.0.1") as client:
        with client.websocket_connect(WS) as ws:
            assert receive(ws)["type"] == "ready"
            ws.send_json(slow)
            wait_for(lambda: "seed 12345, 50 step(s)" in cog.log_path.read_text(), "the prediction to start", 120)
        canceled = lambda: cog.log_path.read_text().count("Prediction cancelled") > canceled_before  # noqa: E731
        wait_for(canceled, "coglet to cancel it", 120)
    assert cog.is_ready_again()


def test_the_command_refuses_an_open_address_without_a_token_before_loading_anything(monkeypatch, capsys):
    from fastsd.realtime.__main__ import main

    monkeypatch.delenv("FASTSD_REALTIME_TOKEN", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--host", "0.0.0.0", "--max-connections", "3"])
    assert "needs FASTSD_REALTIME_TOKEN" in str(stopped.value.code)
    with pytest.raises(SystemExit) as stopped:
        main(["--max-connections", "0"])
    assert "--max-connections must be above 0" in str(stopped.value.code)
