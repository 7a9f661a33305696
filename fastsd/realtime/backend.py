"""Where the realtime server's images come from: the engine in this process, shared by every client
through the batcher, or a Cog HTTP server (a local container, a Replicate model or deployment).

Both take the same arguments (the Cog inputs' names) and give back one encoded image; a session
(fastsd.realtime.session) asks for at most one at a time.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx2

from .. import images
from ..batching import Batcher
from ..engine import Engine
from ..errors import ContentWithheld, InputError
from ..inputs import INPUTS, steps_for_strength
from ..variants import FULL_VAE, TINY_VAE, Variant

# What a client may set: the Cog inputs (fastsd.inputs) that make sense per frame. Not the LoRAs (a
# download per frame), the mask, references or ControlNet, nor vae and the safety switch (the passes decide).
NOT_PER_FRAME = {"mask", "reference_images", "control_image", "controlnet", "controlnet_conditioning_scale",
                 "control_preprocess", "lora_weights", "lora_scale", "extra_lora", "extra_lora_scale", "vae",
                 "num_outputs", "disable_safety_checker"}  # fmt: skip
PARAMETERS = tuple(name for name in INPUTS if name not in NOT_PER_FRAME)  # "image": binary frames, or null
OUTPUT_FORMATS = {"jpg": "image/jpeg", "webp": "image/webp"}
# Cog puts its own words before fastsd's sentence: "Prediction failed: ... InputError: strength must ...".
_COG_ERROR = re.compile(r"(?:InputError|ContentWithheld): (?P<sentence>.*)$", re.DOTALL)
WITHHELD_NOTICE = "The safety checker withheld this image; the previous one stays."


@dataclass
class Rendered:
    payload: bytes
    mime: str
    seed: int
    batch_size: int = 1
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds: prepare, queue, inference, ...


@dataclass(frozen=True)
class Passes:
    """The fast pass (while the input changes) and the refined one (once it rests): the variant's
    default steps and VAE for the refined pass, and for the fast one half the steps (at least one)
    with the tiny autoencoder where it is installed. When that is no cheaper (a 1-step turbo model
    whose default already is the tiny VAE), the refined pass decodes with the full VAE instead."""

    fast_steps: int
    fast_vae: str
    refined_steps: int
    refined_vae: str
    max_steps: int
    scales_with_strength: bool  # image-to-image keeps the step count at any strength (fastsd.inputs)

    @classmethod
    def for_variant(cls, variant: Variant, vae_choices: tuple[str, ...] = (FULL_VAE, TINY_VAE)) -> Passes:
        default_vae = variant.default_vae if variant.default_vae in vae_choices else FULL_VAE
        fast_vae = TINY_VAE if TINY_VAE in vae_choices else default_vae
        fast_steps = max(1, variant.num_inference_steps // 2)
        refined_vae = default_vae
        if (fast_steps, fast_vae) == (variant.num_inference_steps, default_vae):
            refined_vae = FULL_VAE
        return cls(
            fast_steps,
            fast_vae,
            variant.num_inference_steps,
            refined_vae,
            variant.max_steps,
            not variant.recipe.scheduler.timesteps,
        )

    def arguments(self, params: dict[str, Any], has_image: bool, refined: bool) -> dict[str, Any]:
        """The Cog inputs for a pass: the client's parameters with the pass's steps and VAE. Steps the
        client chose stay; the refined pass then differs by the full VAE."""
        arguments = {name: value for name, value in params.items() if name != "image"}
        steps = params.get("num_inference_steps")
        if steps is None:
            steps = self.refined_steps if refined else self.fast_steps
            strength = params.get("strength", 0.8)
            if has_image and self.scales_with_strength and isinstance(strength, (int, float)):
                steps = steps_for_strength(steps, strength, self.max_steps)
            vae = self.refined_vae if refined else self.fast_vae
        else:
            vae = FULL_VAE if refined else self.fast_vae
        arguments.update(num_inference_steps=steps, vae=vae)
        return arguments


class Backend(Protocol):
    """Where a session's images come from (EngineBackend, CogBackend)."""

    variant: Variant
    passes: Passes
    description: str  # what clients are told it is (not where)

    async def render(self, arguments: dict[str, Any], image: bytes | None, queued: Callable[[], None]) -> Rendered:
        """One image for the arguments (Cog's input names) and frame; InputError names a field."""
        ...

    async def close(self) -> None: ...


class EngineBackend:
    """The engine in this process; every client's requests go through one batcher, so frames of
    several clients with one batch key run in one pipeline call."""

    def __init__(self, engine: Engine, batcher: Batcher):
        self.engine, self.batcher = engine, batcher
        self.variant = engine.variant
        self.passes = Passes.for_variant(engine.variant, engine.pipelines.vae_choices)
        self.description = f"{engine.variant.name} in process on {engine.pipelines.device}"

    def _validate(self, arguments: dict[str, Any], image: bytes | None):
        return self.engine.validate(**arguments, image=image)  # a frame is validated as its bytes

    async def render(self, arguments: dict[str, Any], image: bytes | None, queued: Callable[[], None]) -> Rendered:
        started = time.perf_counter()
        request = await asyncio.to_thread(self._validate, arguments, image)
        prepared = time.perf_counter()
        job = self.batcher.submit(request)
        queued()
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.batcher.cancel(job)  # queued: it leaves the queue; running: its call may stop early
            raise
        if not result.images:
            raise ContentWithheld(WITHHELD_NOTICE)
        encoding = time.perf_counter()
        payload = await asyncio.to_thread(self._encode, result, request)
        return Rendered(
            payload,
            OUTPUT_FORMATS[request.output_format],
            result.seed,
            result.batch_size,
            {  # the engine's own work, and the wait for it (queue: other clients' calls, or a thread's wake-up)
                "prepare_ms": (prepared - started) * 1000,  # validating, decoding and fitting the frame
                "queue_ms": result.timings["queue_time"] * 1000,
                "inference_ms": result.inference_time * 1000,
                "safety_ms": result.timings["safety_time"] * 1000,
                "encode_ms": (time.perf_counter() - encoding) * 1000,
            },
        )

    @staticmethod
    def _encode(result, request) -> bytes:
        on_device = getattr(result, "on_device", None)  # the GPU path's frames, kept on the device
        if on_device is not None and request.output_format == "jpg":
            from ..gpu import postprocess  # nvJPEG, as Engine.save uses it; only where that path ran

            return postprocess.encode_jpeg(on_device[:1], request.output_quality)[0]
        return images.encode(result.images[0], request.output_format, request.output_quality)

    async def close(self) -> None:
        await asyncio.to_thread(self.batcher.close)


def _from_cog(error: str) -> Exception:
    """A failed prediction's error as the exception it was: the Cog server reports fastsd's
    InputError as text ("Prediction failed: ... InputError: strength must ..."), and fastsd's
    sentences start with the input they are about."""
    found = _COG_ERROR.search(error)
    if found is None:
        return RuntimeError(error)
    sentence = found["sentence"]
    name = sentence.split(" ", 1)[0].strip(".,:")
    return InputError(sentence, field=name if name in INPUTS else None)


def _image_mime(payload: bytes) -> str:
    if payload.startswith(b"\x89PNG"):
        return "image/png"
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


class CogBackend:
    """A Cog HTTP server: POST /predictions, synchronous (`Prefer: wait`), the input image as a data
    URI. url: a Cog server (http://localhost:5000) or a predictions endpoint (Replicate's
    https://api.replicate.com/v1/models/OWNER/NAME/predictions, or a deployment's), with the token
    from the server's environment, never the page's. A canceled render drops its request, which
    cancels a local Cog server's prediction."""

    def __init__(self, url: str, variant: Variant, token: str | None = None, timeout: float = 120):
        trimmed = url.rstrip("/")
        self.endpoint = trimmed if trimmed.endswith("/predictions") else f"{trimmed}/predictions"
        self.variant = variant
        self.passes = Passes.for_variant(variant)
        # What clients see (the page, /health): not the address, which is the operator's business.
        self.description = f"{variant.name} through a Cog server"
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx2.AsyncClient(timeout=timeout)

    async def render(self, arguments: dict[str, Any], image: bytes | None, queued: Callable[[], None]) -> Rendered:
        inputs = {name: value for name, value in arguments.items() if value is not None}
        if image is not None:
            inputs["image"] = f"data:{_image_mime(image)};base64,{base64.b64encode(image).decode()}"
        started = time.perf_counter()
        queued()
        response = await self._client.post(
            self.endpoint, json={"input": inputs}, headers={"Prefer": "wait", **self._auth}
        )
        answer = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code == 422:  # the schema refused an input: {"detail": [{"loc": [..., name], "msg"}]}
            detail = (answer.get("detail") or [{}])[0]
            name = (detail.get("loc") or ["input"])[-1]
            raise InputError(f"{name}: {detail.get('msg', 'not accepted')}.", field=name)
        if response.status_code >= 400:
            raise RuntimeError(f"the backend answered {response.status_code}: {response.text[:200]}")
        status, error = answer.get("status"), answer.get("error") or ""
        if status == "failed" and "safety checker withheld" in error:
            raise ContentWithheld(WITHHELD_NOTICE)
        if status == "failed":
            raise _from_cog(error)
        if status != "succeeded":
            raise RuntimeError(f"the backend's prediction is {status} (not finished while waiting)")
        payload = await self._output_bytes(answer["output"][0])
        metrics = answer.get("metrics") or {}
        seconds = (time.perf_counter() - started) * 1000
        return Rendered(
            payload,
            _image_mime(payload),
            int(metrics.get("seed", arguments.get("seed") or 0)),
            int(metrics.get("batch_size", 1)),
            {
                "queue_ms": float(metrics.get("queue_time", 0)) * 1000,
                "inference_ms": float(metrics.get("inference_time", metrics.get("predict_time", 0))) * 1000,
                "backend_ms": seconds,
            },
        )

    async def _output_bytes(self, output: str) -> bytes:
        if output.startswith("data:"):
            return base64.b64decode(output.split(",", 1)[1])
        # A file URL (Replicate): the token goes only to the API's own host.
        same_host = urlsplit(output).netloc == urlsplit(self.endpoint).netloc
        response = await self._client.get(output, headers=self._auth if same_host else {})
        response.raise_for_status()
        return response.content

    async def close(self) -> None:
        await self._client.aclose()
