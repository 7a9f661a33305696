"""Smoke-test a built fastsd image the way a registry runs it, through Cog's HTTP API.

    python .github/scripts/smoke_test_image.py IMAGE      # docker run -d -p PORT:5000 IMAGE
    python .github/scripts/smoke_test_image.py --url URL  # a server that is already running

Waits for /health-check to say READY, makes one 64x64 image and checks that it decodes at that
size, then sends inputs that the schema `cog build` generated from predict.py must refuse with
HTTP 422 (a server started without that schema, as in the unit tests, lets them through: this is
the check that the image has it). Needs Pillow; the rest is the standard library. Prints the
container's log when anything fails.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

from PIL import Image

GOOD = {"prompt": "a red apple", "width": 64, "height": 64}
# Each breaks one constraint of predict.py's signature that only the schema enforces before run(),
# keyed by the input the 422 must name.
BAD = {
    "num_outputs": {"prompt": "a red apple", "num_outputs": 99},  # le=8
    "output_format": {"prompt": "a red apple", "output_format": "gif"},  # choices
    "prompt": {"width": 64},  # required
}


class Failed(Exception):
    pass


def call(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def wait_ready(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, text = call("GET", f"{url}/health-check", timeout=10)
            state = json.loads(text) if status == 200 else {}
            last = state.get("status", f"HTTP {status}")
            if last == "READY":
                return state
            if last in ("SETUP_FAILED", "DEFUNCT"):
                raise Failed(f"setup failed: {json.dumps(state.get('setup', state))[:4000]}")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
            last = repr(error)  # the server is not listening yet
        time.sleep(2)
    raise Failed(f"not READY after {timeout:.0f} s (last: {last})")


def decode_image(uri: str) -> Image.Image:
    header, _, encoded = uri.partition(",")
    if not (header.startswith("data:image/") and header.endswith(";base64")):
        raise Failed(f"output is not an image data URI: {uri[:80]!r}")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        image.load()
    except (binascii.Error, OSError) as error:
        raise Failed(f"output does not decode as an image: {error}") from error
    return image


def check_prediction(url: str) -> None:
    status, text = call("POST", f"{url}/predictions", {"input": GOOD}, timeout=300)
    if status != 200:
        raise Failed(f"POST /predictions {GOOD}: HTTP {status}: {text[:2000]}")
    response = json.loads(text)
    if response.get("status") != "succeeded":
        raise Failed(f"prediction {response.get('status')}: {response.get('error')}\n{response.get('logs', '')}")
    output = response.get("output")
    if not isinstance(output, list) or len(output) != 1:
        raise Failed(f"expected one output, got {str(output)[:200]}")
    image = decode_image(output[0])
    if image.size != (64, 64):
        raise Failed(f"expected a 64x64 image, got {image.size}")
    print(f"ok: one {image.format} image, {image.size[0]}x{image.size[1]}, metrics {response.get('metrics')}")


def check_rejections(url: str) -> None:
    for field, bad in BAD.items():
        status, text = call("POST", f"{url}/predictions", {"input": bad})
        if status != 422:
            raise Failed(f"{bad} answered HTTP {status}, not 422: is the schema missing from the image? {text[:500]}")
        if f'"{field}"' not in text:
            raise Failed(f"{bad} was refused, but the 422 does not name {field}: {text[:500]}")
        print(f"ok: {bad} refused with 422: {text[:200]}")
    status, text = call("GET", f"{url}/openapi.json")
    if status != 200 or "num_outputs" not in text:
        raise Failed(f"/openapi.json: HTTP {status}, no num_outputs input in it: {text[:300]}")
    print("ok: /openapi.json describes the inputs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("image", nargs="?", help="the image to run")
    target.add_argument("--url", help="a running server instead, e.g. http://127.0.0.1:5000")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--setup-timeout", type=float, default=600)
    args = parser.parse_args()

    container = None
    url = args.url
    if args.image:
        container = subprocess.run(
            ["docker", "run", "-d", "-p", f"127.0.0.1:{args.port}:5000", args.image],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        url = f"http://127.0.0.1:{args.port}"
    try:
        state = wait_ready(url.rstrip("/"), args.setup_timeout)
        print(f"ok: READY ({(state.get('setup') or {}).get('status', '')})")
        check_prediction(url.rstrip("/"))
        check_rejections(url.rstrip("/"))
        return 0
    except Failed as failure:
        print(f"::error::{failure}")
        if container:
            subprocess.run(["docker", "logs", "--tail", "200", container], check=False)
        return 1
    finally:
        if container:
            subprocess.run(["docker", "rm", "-f", container], check=False, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
