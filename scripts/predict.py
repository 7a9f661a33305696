#!/usr/bin/env python3
"""Ask a running fastsd server (scripts/serve, or the image) for images and write them to files.

    python3 scripts/predict.py prompt="a lighthouse at dawn" seed=42
    python3 scripts/predict.py prompt="a red barn at night" image=@barn.jpg strength=0.6 --out barns
    python3 scripts/predict.py prompt="a fox" num_outputs=2 output_format=png --url http://gpu-box:5000
    python3 scripts/predict.py prompt="the cat on the sofa" reference_images=@cat.jpg reference_images=@sofa.jpg

Each input is NAME=VALUE, as the API takes it (README's inputs table): numbers and true/false are
read as such, @FILE sends a local image as a data URI, anything else is text; a list input
(reference_images) takes the name once per item. The images go to
outputs/ (or --out), named after the seed; the metrics are printed. Standard library only: any
python3 runs it, no .venv needed.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
import urllib.error
import urllib.request
from pathlib import Path

EXTENSIONS = {"image/webp": "webp", "image/jpeg": "jpg", "image/png": "png"}
LIST_INPUTS = {"reference_images"}  # predict.py's list[...] inputs


def collect(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """The request's inputs: a list input's values in order, any other input's last value."""
    inputs: dict[str, object] = {}
    for name, value in pairs:
        if name in LIST_INPUTS:
            inputs.setdefault(name, [])
            inputs[name].append(value)  # type: ignore[union-attr]
        else:
            inputs[name] = value
    return inputs


def parse_input(pair: str) -> tuple[str, object]:
    name, separator, text = pair.partition("=")
    if not separator or not name:
        raise SystemExit(f'scripts/predict.py: {pair!r} is not NAME=VALUE (for example prompt="a cat" seed=3)')
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        if not path.is_file():
            raise SystemExit(f"scripts/predict.py: {name}={text}: there is no file {path}")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return name, f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    if text in ("true", "false"):
        return name, text == "true"
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="NAME=VALUE")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the server (default http://127.0.0.1:5000)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the images (default outputs)")
    args = parser.parse_args(argv)
    body = json.dumps({"input": collect([parse_input(pair) for pair in args.inputs])}).encode()
    request = urllib.request.Request(
        f"{args.url.rstrip('/')}/predictions", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=3600) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = json.loads(error.read() or b"{}").get("detail")
        reasons = "; ".join(f"{item['loc'][-1]}: {item['msg']}" for item in detail) if isinstance(detail, list) else ""
        print(f"refused (HTTP {error.code}): {reasons or detail or error.reason}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"no server answers at {args.url} ({error}); start one with scripts/serve", file=sys.stderr)
        return 1
    if answer.get("status") != "succeeded":
        print(f"{answer.get('status')}: {answer.get('error')}", file=sys.stderr)
        return 1
    metrics = answer.get("metrics") or {}
    args.out.mkdir(parents=True, exist_ok=True)
    seed = metrics.get("seed")
    for index, uri in enumerate(answer["output"]):
        if uri.startswith("data:"):
            header, data = uri.split(",", 1)
            mime, payload = header.removeprefix("data:").split(";")[0], base64.b64decode(data)
        else:  # a server with an upload URL answers with the files' addresses
            with urllib.request.urlopen(uri, timeout=600) as response:
                mime, payload = response.headers.get_content_type(), response.read()
        name = f"seed-{seed + index}" if isinstance(seed, int) else f"image-{index}"  # image i uses seed + i
        path = args.out / f"fastsd-{name}.{EXTENSIONS.get(mime, 'bin')}"
        path.write_bytes(payload)
        print(path)
    print(json.dumps(metrics), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
