"""Memory after a large input image is handed back, whichever input it was: through the real Cog server
on sd15-lcm, the worker process's resident memory (from /proc) after a request with a 36-megapixel
mask and a small image, or a 36-megapixel control image and a small output, against what it was
before. (A large `image` is covered the same way: inputs.validate hands back after any.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from fastsd_testing.cog_server import data_uri, output_pixels, ready_server

SMALL = dict(prompt="a lighthouse at dusk", seed=3, num_inference_steps=2, strength=1.0)
# Decoded, flattened and resized, a 36-megapixel RGBA input passes through some 400 MB of buffers:
# kept by the allocator, the worker grows by about 360 MB (measured); handed back, by a few MB.
LARGE_SIDE = 6000
GROWTH_ALLOWED_MB = 100


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _half_white(width: int, height: int, white: bool = True) -> bytes:
    """White (repaint) on the left half, black (keep) on the right, opaque RGBA (as painting tools
    save masks): compresses to a few hundred KB. white=False: all black."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    if white:
        mask.paste((255, 255, 255, 255), (0, 0, width // 2, height))
    return _png(mask)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


def _descendants(pid: int) -> list[int]:
    pending, found = [pid], []
    while pending:
        children = _children(pending.pop())
        found.extend(children)
        pending.extend(children)
    return found


def _resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def worker_resident_mb(server) -> float:
    """The resident memory of the server's worker: the process under it that holds the model (the
    largest; the server itself is a small Rust process)."""
    return max(_resident_mb(pid) for pid in _descendants(server.process.pid))


@pytest.fixture(scope="module")
def cog(weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "input-memory.log"
    environment = {
        "FASTSD_VARIANT": "sd15-lcm",
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_CONTROLNETS": "canny",
    }
    yield from ready_server(environment, log_path)


def _inputs(large_input: str, side: int) -> dict:
    """A request whose large_input is side x side, every other image input small."""
    image = data_uri(_png(Image.new("RGB", (64, 64), (200, 40, 40))))
    if large_input == "mask":
        return dict(image=image, mask=data_uri(_half_white(side, side)))
    # The map the ControlNet follows, fitted to a small output (canny edges found after fitting).
    return dict(control_image=data_uri(_half_white(side, side)), controlnet="canny", width=64, height=64)


@pytest.mark.parametrize("large_input", ["mask", "control_image"])
def test_memory_after_a_large_input_is_handed_back(cog, large_input):
    for _ in range(2):  # the path's first-use costs, paid before measuring
        output_pixels(cog.predict(**_inputs(large_input, 64), **SMALL))
    before = worker_resident_mb(cog)
    output_pixels(cog.predict(**_inputs(large_input, LARGE_SIDE), **SMALL))
    after = worker_resident_mb(cog)
    measured = f"worker resident memory: {before:.0f} MB before, {after:.0f} MB after a {LARGE_SIDE}px {large_input}"
    print(measured)
    assert after - before < GROWTH_ALLOWED_MB, measured


def test_memory_after_a_large_input_is_handed_back_when_the_request_is_refused(cog):
    image = data_uri(_png(Image.new("RGB", (64, 64), (200, 40, 40))))
    for _ in range(2):
        output_pixels(cog.predict(**_inputs("mask", 64), **SMALL))
    before = worker_resident_mb(cog)
    all_black = data_uri(_half_white(LARGE_SIDE, LARGE_SIDE, white=False))
    answer = cog.post(dict(image=image, mask=all_black, **SMALL))[1]
    assert "mask is all black" in str(answer.get("error")), answer
    assert cog.is_ready_again()
    after = worker_resident_mb(cog)
    measured = f"worker resident memory: {before:.0f} MB before, {after:.0f} MB after a refused {LARGE_SIDE}px mask"
    print(measured)
    assert after - before < GROWTH_ALLOWED_MB, measured
