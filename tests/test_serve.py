"""scripts/serve: the one command that starts the Cog server as the image does, for a user on any
machine (the worker on the .venv's interpreter whatever `python` PATH finds first, the slots
predict.py declares, the port asked for)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from fastsd_testing.cog_server import PROJECT_ROOT, _free_port, declared_concurrency


def _get(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for _ in range(100):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # Cog 0.23's 409 for requests at the same instant
            if error.code != 409:
                raise
            time.sleep(0.01)
    raise AssertionError(f"{url} kept answering 409")


def test_serve_is_ready_on_its_port_with_the_declared_slots_whatever_python_comes_first(weights_root, tmp_path):
    # A PATH whose `python` is not the .venv's (or is missing): coglet's worker would fail to import.
    decoy = tmp_path / "decoy-bin"
    decoy.mkdir()
    (decoy / "python").write_text("#!/bin/sh\necho 'not the venv python' >&2\nexit 1\n")
    (decoy / "python").chmod(0o755)
    port = _free_port()
    environment = dict(
        os.environ,
        PATH=f"{decoy}:/usr/bin:/bin",
        FASTSD_VARIANT="sd-turbo",
        FASTSD_WEIGHTS_ROOT=str(weights_root),
        TMPDIR=str(tmp_path),
    )
    environment.pop("COG_MAX_CONCURRENCY", None)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [PROJECT_ROOT / "scripts" / "serve", "--port", str(port)], env=environment, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, state = time.monotonic() + 300, {}
        while time.monotonic() < deadline and state.get("status") not in ("READY", "SETUP_FAILED"):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                state = _get(f"{url}/health-check", timeout=5)
            except OSError:
                pass
            time.sleep(0.3)
        assert state.get("status") == "READY", (tmp_path / "serve.log").read_text()[-3000:]
        text = (tmp_path / "serve.log").read_text()
        assert f"with {declared_concurrency()} slots" in text and f'"num_slots":{declared_concurrency()}' in text
        # More requests at once than a bare server's single slot: none is refused.
        body = {"input": {"prompt": "a kite", "width": 64, "height": 64}}
        with ThreadPoolExecutor(max_workers=3) as pool:
            answers = list(pool.map(lambda _: _get(f"{url}/predictions", body), range(3)))
        assert [answer["status"] for answer in answers] == ["succeeded"] * 3
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_serve_refuses_a_port_out_of_range():
    result = subprocess.run(
        [PROJECT_ROOT / "scripts" / "serve", "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "--port must be from 1 to 65535" in result.stderr
