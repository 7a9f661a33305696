"""One client's connection: its parameters, its latest frame, and at most one generation in flight.

Every input (a frame, a parameter change, a request to refine) marks the session as having new
input; the one generation at a time takes the parameters and frame as they are when it starts,
so inputs that arrive meanwhile replace each other and only the newest is rendered. A slow model
never builds a backlog, and the last input is always the one shown.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import ContentWithheld, InputError
from .backend import OUTPUT_FORMATS, PARAMETERS, Backend
from .settings import Limits

log = logging.getLogger(__name__)

FRAME_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_TEXT_MESSAGE = 65536
COUNTED = ("inputs", "replaced", "generations", "skipped", "errors", "withheld")  # what stats reports


class NotFinite(str):
    """A number the JSON reader met that no finite float holds (NaN, Infinity, 1e309): kept as
    written, so that the input it was given for is refused by name."""


def _finite_or_not(text: str) -> float | NotFinite:
    value = float(text)
    return value if math.isfinite(value) else NotFinite(text)


@dataclass
class Pending:
    """The newest input not yet rendered: which number it has and which pass it asks for."""

    number: int
    refined: bool
    received: float


class Session:
    def __init__(self, backend: Backend, limits: Limits, websocket, seed: int):
        self.backend, self.limits, self.websocket = backend, limits, websocket
        # A fixed seed per session: the picture stays stable while the frame or prompt changes.
        self.params: dict[str, Any] = {"seed": seed, "output_format": "jpg", "output_quality": 80}
        self.image: bytes | None = None
        self._accepted: dict[str, Any] = dict(self.params)  # the parameters of the last good render
        self._accepted_image: bytes | None = None
        self.pending: Pending | None = None
        self.state = "idle"  # preparing, queued (submitted to the model), idle
        self.counts: Counter[str] = Counter()  # of COUNTED
        self._new_input = asyncio.Event()
        self._last_rendered: tuple | None = None
        self._send_lock = asyncio.Lock()
        self._burst = max(1.0, limits.max_messages_per_second)
        self._allowance, self._refilled = self._burst, time.monotonic()
        self._rate_told = 0.0

    # --- what the client sends ---

    def allow_message(self) -> bool:
        """A token bucket: max_messages_per_second, with a burst of one second's worth."""
        now = time.monotonic()
        rate = self.limits.max_messages_per_second
        self._allowance = min(self._burst, self._allowance + (now - self._refilled) * rate)
        self._refilled = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    async def refuse_for_rate(self) -> None:
        if time.monotonic() - self._rate_told >= 1:  # one notice a second, not one per message
            self._rate_told = time.monotonic()
            rate = self.limits.max_messages_per_second
            await self.error("rate", f"at most {rate:g} messages a second; some were dropped.")

    async def on_frame(self, data: bytes) -> None:
        if len(data) > self.limits.max_frame_bytes:
            await self.error("image", f"a frame must be at most {self.limits.max_frame_bytes} bytes, got {len(data)}.")
            return
        try:
            with Image.open(io.BytesIO(data)) as header:  # the header only: nothing is decoded yet
                kind, (width, height) = header.format, header.size
        except Image.DecompressionBombError:  # a header claiming far more pixels than any frame has
            await self.error("image", f"a frame must have at most {self.limits.max_frame_pixels} pixels.")
            return
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            await self.error("image", "a frame must be a JPEG, PNG or WebP image; this one could not be read.")
            return
        if kind not in FRAME_FORMATS:
            await self.error("image", f"a frame must be a JPEG, PNG or WebP image, got {kind}.")
            return
        if width * height > self.limits.max_frame_pixels:
            await self.error(
                "image", f"a frame must have at most {self.limits.max_frame_pixels} pixels, got {width}x{height}."
            )
            return
        self.image = data
        self._mark_new_input(refined=False)

    async def on_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_MESSAGE:
            await self.error("message", f"a text message must be at most {MAX_TEXT_MESSAGE} characters.")
            return
        try:
            # NaN, Infinity and numbers past a float's range are no numbers (as the Cog server says).
            message = json.loads(text, parse_constant=NotFinite, parse_float=_finite_or_not)
        except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
            message = None
        if not isinstance(message, dict):
            await self.error("message", 'a text message must be a JSON object with a "type": params, refine or stats.')
            return
        kind = message.pop("type", None)
        if kind == "params":
            await self._on_params(message)
        elif kind == "refine":
            self._mark_new_input(refined=True)
        elif kind == "stats":
            counts = {name: self.counts[name] for name in COUNTED}
            await self.send({"type": "stats", "state": self.state, "pending": self.pending is not None, **counts})
        else:
            await self.error("type", f"type must be params, refine or stats, got {kind!r}.")

    async def _on_params(self, changes: dict[str, Any]) -> None:
        unknown = [name for name in changes if name not in PARAMETERS]
        if unknown:
            known = ", ".join(PARAMETERS)
            await self.error(unknown[0], f"{unknown[0]} is not a parameter; the parameters are {known}.")
            return
        if "image" in changes and changes["image"] is not None:
            await self.error("image", "image is set by binary frames; send null to go back to text-to-image.")
            return
        for name, value in changes.items():
            if isinstance(value, NotFinite):
                await self.error(name, f"{name} must be a finite number, got {value}.")
                return
        if "output_format" in changes and (
            not isinstance(changes["output_format"], str) or changes["output_format"] not in OUTPUT_FORMATS
        ):
            allowed, given = " or ".join(OUTPUT_FORMATS), changes["output_format"]
            await self.error("output_format", f"output_format must be {allowed}, got {given!r}.")
            return
        if "image" in changes:
            self.image = None
            del changes["image"]
        self.params.update(changes)
        self._mark_new_input(refined=False)

    def _mark_new_input(self, refined: bool) -> None:
        self.counts["inputs"] += 1
        if self.pending is not None:
            self.counts["replaced"] += 1
        self.pending = Pending(self.counts["inputs"], refined, time.perf_counter())
        self._new_input.set()

    # --- the one generation at a time ---

    async def run(self) -> None:
        """Render the newest input whenever there is one; canceled when the client goes."""
        while True:
            await self._new_input.wait()
            self._new_input.clear()
            taken, self.pending = self.pending, None
            if taken is not None:
                await self._render(taken)

    async def _render(self, taken: Pending) -> None:
        params, image = dict(self.params), self.image
        arguments = self.backend.passes.arguments(params, image is not None, taken.refined)
        key = (sorted(arguments.items()), image)
        if key == self._last_rendered:  # nothing changed since the last image: skip it, and say so
            self.counts["skipped"] += 1
            await self.send({"type": "unchanged", "input": taken.number})
            return
        self.state = "preparing"
        try:
            rendered = await self.backend.render(arguments, image, queued=lambda: setattr(self, "state", "queued"))
        except ContentWithheld as withheld:
            self.counts["withheld"] += 1
            self._last_rendered = key  # the same input would be withheld again
            await self.send({"type": "withheld", "input": taken.number, "message": str(withheld)})
            return
        except InputError as error:
            name = error.field
            self._take_back(name, params, image)
            await self.error(name, str(error), taken.number)
            return
        except Exception as error:  # noqa: BLE001 - the client hears of it, the session goes on
            log.exception("a realtime generation failed")
            await self.error(None, f"the generation failed: {error}", taken.number)
            return
        finally:
            self.state = "idle"
        self.counts["generations"] += 1
        self._last_rendered = key
        self._accepted, self._accepted_image = params, image
        latency = (time.perf_counter() - taken.received) * 1000
        result = {
            "type": "result",
            "input": taken.number,
            "pass": "refined" if taken.refined else "fast",
            "seed": rendered.seed,
            "latency_ms": round(latency, 2),
            "batch_size": rendered.batch_size,
            "num_inference_steps": arguments["num_inference_steps"],
            "vae": arguments["vae"],
            "mime": rendered.mime,
            **{name: round(value, 2) for name, value in rendered.timings.items()},
        }
        await self.send(result, rendered.payload)

    def _take_back(self, name: str | None, tried: dict[str, Any], image: bytes | None) -> None:
        """A refused value goes back to the last good one (unless the client has sent another since),
        so the next input renders as it would have without the mistake."""
        if name == "image" and self.image is image:
            self.image = self._accepted_image
        elif name in self.params and self.params[name] == tried.get(name):
            if name in self._accepted:
                self.params[name] = self._accepted[name]
            else:
                del self.params[name]

    # --- what the server sends ---

    async def send(self, message: dict[str, Any], payload: bytes | None = None) -> None:
        """A JSON message (and the binary image it announces, right after it). A client that stops
        reading blocks only its own session, and for at most the idle timeout."""
        async with self._send_lock:
            async with asyncio.timeout(self.limits.idle_timeout):
                await self.websocket.send_text(json.dumps(message))
                if payload is not None:
                    await self.websocket.send_bytes(payload)

    async def error(self, name: str | None, message: str, number: int | None = None) -> None:
        self.counts["errors"] += 1
        await self.send({"type": "error", "field": name, "message": message, "input": number})
