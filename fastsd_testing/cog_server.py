"""The real Cog HTTP server (coglet), started the way the image starts it: for `scripts/serve`, the
tests and the benchmarks (one launcher for all three).

As the image does: this interpreter for the worker (coglet spawns it as plain `python`, which on
a machine whose first `python` is another one never becomes READY), the slots predict.py declares
(`cog build` bakes them in as COG_MAX_CONCURRENCY; a bare server would have 1), and the port.

    .venv/bin/python -m fastsd_testing.cog_server --port 5000     (scripts/serve runs this)

Standard library only, so the benchmark runs on a bare GPU machine with nothing to install beyond
the wheels it carries.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _python_folder(scratch: Path) -> Path:
    """A folder whose `python` is this interpreter: coglet spawns its worker as plain `python`,
    which a machine with only `python3` (or another Python first on PATH) would get wrong."""
    own = Path(sys.executable).parent
    if (own / "python").exists() and (own / "python").resolve() == Path(sys.executable).resolve():
        return own
    folder = scratch / ".python-shim"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "python"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(sys.executable)
    return folder


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def decode_output(uri: str):
    """(bytes, decoded PIL image) of one output data URI."""
    from PIL import Image

    header, encoded = uri.split(",", 1)
    if not (header.startswith("data:") and header.endswith(";base64")):
        raise ValueError(f"not a base64 data URI: {header[:60]}")
    payload = base64.b64decode(encoded)
    image = Image.open(io.BytesIO(payload))
    image.load()
    return payload, image


def declared_concurrency(predict_py: Path = PROJECT_ROOT / "predict.py") -> int:
    """The max of @cog.concurrent(max=N) on run(): what `cog build` bakes into the image as
    COG_MAX_CONCURRENCY (the bare server reads only that variable, and defaults to 1)."""
    for node in ast.walk(ast.parse(predict_py.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "concurrent":
            for keyword in node.keywords:
                if keyword.arg == "max":
                    return int(ast.literal_eval(keyword.value))
    return 1


def server_command(host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "cog.server.http", "--host", host]


def server_environment(port: int, scratch: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the image's server runs with: predict.py's runner, its declared slots (unless
    COG_MAX_CONCURRENCY is given), the port, and this interpreter as the worker's `python`."""
    environment = dict(os.environ, COG_PREDICT_TYPE_STUB="predict.py:Predictor")
    environment.update(env or {}, PORT=str(port))  # env may name another predictor (the Cog floor's)
    environment.setdefault("COG_MAX_CONCURRENCY", str(declared_concurrency()))
    environment["PATH"] = f"{_python_folder(scratch)}{os.pathsep}{environment.get('PATH', '')}"
    return environment


def run_folder(folder: Path, predictor: str, schema: bool = True) -> Path:
    """The folder the server runs in, as the image's /src: the predictor's file (linked from the
    project) and, as `cog build` writes it, the input schema (fastsd_testing.cog_schema), so that
    coglet validates as in the image; schema=False runs it without one (every input reaches run()).
    Its own folder, never the project's: a schema left there would change every later server."""
    from .cog_schema import SCHEMA_PATH, write

    module = predictor.split(":")[0]
    link = folder / module
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(PROJECT_ROOT / module)
    if schema:
        write(folder, predictor)
    else:
        (folder / SCHEMA_PATH).unlink(missing_ok=True)
    return folder


class CogServer:
    """`python -m cog.server.http` on a free loopback port, with the given environment, the
    prediction slots and the input schema a built image would have."""

    def __init__(self, env: dict[str, str], log_path: Path, schema: bool = True):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        environment = server_environment(self.port, log_path.parent, env)
        folder = run_folder(log_path.parent / f"cog-run-{self.port}", environment["COG_PREDICT_TYPE_STUB"], schema)
        self.process = subprocess.Popen(
            server_command(),
            cwd=folder,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def health(self) -> dict:
        return self._request("GET", "/health-check", timeout=10)[1]

    def wait_for_setup(self, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                state = self.health()
                if state.get("status") not in (None, "STARTING"):
                    return state
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def is_ready_again(self, timeout: float = 10) -> bool:
        """READY once the worker has released its slot (BUSY may linger a moment after a reply)."""
        deadline = time.monotonic() + timeout
        while self.health()["status"] != "READY":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def post(self, inputs: dict, prediction_id: str | None = None) -> tuple[int, dict]:
        """POST /predictions, waiting for the reply: (HTTP status, body)."""
        body = {"input": inputs, **({"id": prediction_id} if prediction_id else {})}
        return self._request("POST", "/predictions", body)

    def predict(self, prediction_id: str | None = None, **inputs) -> dict:
        """One prediction, waiting for it. No retry: a client that waits for each reply must never
        be answered 409 (busy)."""
        status, answer = self.post(inputs, prediction_id)
        if status != 200:
            raise RuntimeError(f"POST /predictions answered {status}: {answer}")
        return answer

    def refusal(self, **inputs) -> str:
        """What a refused request is told: coglet's 422 for what the input schema refuses (each
        input's name and Cog's message), or the failed prediction's error (fastsd's sentence)."""
        status, answer = self.post(inputs)
        if status == 422:
            return "; ".join(f"{item['loc'][-1]}: {item['msg']}" for item in answer["detail"])
        if status != 200 or answer.get("status") != "failed":
            raise AssertionError(f"expected a refusal, got {status}: {str(answer)[:300]}")
        return answer["error"]

    def predict_retrying(self, prediction_id: str | None = None, attempts: int = 100, **inputs) -> dict:
        """One prediction as docs/serving.md tells clients to send it: Cog 0.23 can answer 409 to
        requests that arrive at the same instant even with slots free, so a 409 is retried."""
        for _ in range(attempts):
            status, answer = self.post(inputs, prediction_id)
            if status != 409:
                break
            time.sleep(0.01)
        if status != 200:
            raise RuntimeError(f"POST /predictions answered {status}: {answer}")
        return answer

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def wait_for_log(self, needles: list[str], since: int = 0, timeout: float = 120) -> None:
        """Until every needle is in the server's log after byte `since` (log_size() before sending):
        the worker logs each request as it joins fastsd's queue."""
        deadline = time.monotonic() + timeout

        def logged() -> str:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")

        while not all(needle in logged() for needle in needles):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not logged after {timeout} s: {needles}")
            time.sleep(0.02)

    def cancel(self, prediction_id: str) -> int:
        return self._request("POST", f"/predictions/{prediction_id}/cancel", {})[0]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def ready_server(environment: dict[str, str], log_path: Path):
    """A CogServer that has finished setup (else the log's end is the failure), stopped after use:
    `yield from ready_server(...)` in a pytest fixture."""
    server = CogServer(environment, log_path)
    try:
        assert server.wait_for_setup()["status"] == "READY", log_path.read_text()[-3000:]
        yield server
    finally:
        server.stop()


def output_pixels(response: dict) -> list:
    """The images of a successful prediction, as int arrays (RGB), to compare pixel by pixel."""
    import numpy as np

    assert response["status"] == "succeeded", response.get("error")
    return [np.asarray(decode_output(uri)[1].convert("RGB"), dtype=int) for uri in response["output"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve predict.py with the Cog HTTP server, as the image does (POST /predictions)."
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")), help="default 5000")
    parser.add_argument(
        "--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); 0.0.0.0 listens on every address"
    )
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be from 1 to 65535, got {args.port}")
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "fastsd-serve"
    environment = server_environment(args.port, scratch)
    print(
        f"fastsd: serving predict.py on http://{args.host}:{args.port} with {environment['COG_MAX_CONCURRENCY']} "
        "slots; READY at /health-check once setup is done (Ctrl-C stops it)",
        flush=True,
    )
    os.chdir(PROJECT_ROOT)
    os.execvpe(server_command(args.host)[0], server_command(args.host), environment)
    return 0  # not reached: the server replaces this process


if __name__ == "__main__":
    sys.exit(main())
