"""Requests -> images on pipelines built once: seeding, prompt embeddings, and one pipeline call
for a batch of requests that can share it (fastsd.batching decides which do)."""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import images, inputs, pipelines, prompts
from .errors import ContentWithheld, InputError
from .gpu import Graphs, graphs_setting, postprocess
from .inputs import GenerationRequest
from .loras import hotswap
from .loras.adapters import Adapters
from .prompts import PromptEncoder
from .tasks import Task
from .variants import CONTROLNETS, CONTROLNETS_ENV, FULL_VAE, Variant, variant_from_environment
from .weights.layout import model_folder
from .weights.provision import ensure_model_folder, ensure_weights

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: list[Image.Image]
    seed: int
    inference_time: float  # seconds in the diffusers call: prompt encoding, steps, decoding
    batch_size: int = 1  # images in the pipeline call this request ran in (its own and others')
    withheld: int = 0  # images the safety checker left out (images holds the others)
    timings: dict[str, float] = field(default_factory=dict)  # encode_time, queue_time, safety_time
    on_device: torch.Tensor | None = None  # with graphs on CUDA: the kept images as uint8, for nvJPEG


def _share(mask: Image.Image) -> float:
    """How much of the image a mask repaints (grey counts in part)."""
    histogram = mask.histogram()
    return sum(level * count for level, count in enumerate(histogram)) / (255 * sum(histogram))


def _split(images: Sequence, counts: list[int]) -> list:
    """A call's images (a list, or a tensor's batch) as each request's own, in order."""
    return [images[start:end] for start, end in pairwise([0, *accumulate(counts)])]


class Interrupted(Exception):
    """Every request of a running call was canceled: the call stops at the end of a step."""


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with the same key can run as one pipeline call (prompts, seeds and output formats
    may differ: each image gets its own embeddings and generator)."""
    strength = None if request.task is Task.TEXT_TO_IMAGE else request.strength
    scale = request.conditioning_scale if request.controlnet else None
    return (*request.mode, request.width, request.height, request.num_inference_steps, request.guidance_scale,
            strength, scale, lora_key(request))  # fmt: skip


def lora_key(request: GenerationRequest) -> tuple:
    return tuple((lora.adapter, scale) for lora, scale in request.loras)


class PromptCache:
    """Encoded prompts for the most recent (prompt, negative prompt, guidance) requests.

    The realtime case sends the same prompt with every new frame or seed: the text encoders then
    run once, not per request. Bounded, least recently used out first. Keyed on the text as written;
    fastsd.prompts reads its weighting and its chunks past 77 tokens.
    """

    def __init__(self, pipeline, device: str, capacity: int = 32):
        self._encoder = PromptEncoder(pipeline, device)
        self._capacity = capacity
        self._entries: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the batch worker and a direct caller may both ask

    def get(
        self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple = ()
    ) -> dict[str, torch.Tensor]:
        """loras: the (adapter, scale) pairs active while encoding: a LoRA with text-encoder layers
        or new tokens encodes the same prompt differently, so it is part of the key."""
        with self._lock:
            return self._get(prompt, negative_prompt, guidance, loras)

    def check(self, prompt: str, negative_prompt: str | None, count_tokens: bool = True) -> None:
        """Refuse bad syntax and (count_tokens) prompts past fastsd.prompts' limits, with one sentence."""
        texts = [(prompts.parse(prompt, "prompt"), "prompt")]
        if negative_prompt is not None:
            texts.append((prompts.parse(negative_prompt, "negative_prompt"), "negative_prompt"))
        if count_tokens:
            with self._lock:  # the tokenizers are the encoder's: one thread at a time
                for parsed, name in texts:
                    self._encoder.check(parsed, name)

    def _get(self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple) -> dict[str, torch.Tensor]:
        key = (prompt, negative_prompt, guidance, loras)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        with torch.inference_mode():
            embeddings = self._encoder.encode(prompt, negative_prompt, guidance, loras)
        self._entries[key] = embeddings
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return embeddings


class Engine:
    """One variant's pipelines, loaded once, and the per-request path."""

    def __init__(self, variant: Variant, loaded: pipelines.Pipelines):
        self.variant = variant
        self.pipelines = loaded
        self.prompts = PromptCache(loaded.text_to_image, loaded.device)
        self.adapters = Adapters(loaded.text_to_image, variant, loaded.lora_slots)
        # FASTSD_GRAPHS=on: the hot modules replay captured graphs (fastsd.gpu); off: nothing installed.
        # A whole-model compile brings its own graphs; regional compilation's blocks go inside ours.
        whole_compile = pipelines.compile_mode() not in (None, pipelines.REGIONAL)
        self.graphs = Graphs.for_pipelines(loaded, variant.max_batch_images, whole_compile)
        # Each request's files get a folder of their own: Cog reads them after run() returns, while
        # other requests go on. The oldest folders go once there are more than a few slots' worth,
        # the whole tree at exit.
        self._output_root = Path(tempfile.mkdtemp(prefix="fastsd-outputs-"))
        self._output_dirs: deque[Path] = deque()
        self._output_lock = threading.Lock()
        atexit.register(shutil.rmtree, self._output_root, ignore_errors=True)
        self._encoders = ThreadPoolExecutor(max_workers=min(inputs.MAX_OUTPUTS, os.cpu_count() or 1))
        self._accepted = {
            mode: set(inspect.signature(pipeline.__call__).parameters) for mode, pipeline in loaded.by_mode.items()
        }
        # A compiled UNet serves LoRAs only through its slots (fastsd.loras.hotswap).
        self._refuses_loras = pipelines.compile_mode() is not None and loaded.lora_slots is None
        self._default_vae = variant.default_vae
        if self._default_vae not in loaded.vae_choices:
            log.info(
                "vae %s is the default for %s but %s is not installed: using the full VAE",
                self._default_vae,
                variant.name,
                variant.tiny_vae,
            )
            self._default_vae = FULL_VAE

    @classmethod
    def load(cls, variant: Variant, device: str | None = None, dtype: torch.dtype | None = None) -> Engine:
        return cls(variant, pipelines.load(variant, device, dtype))

    @classmethod
    def from_environment(cls, weights_url: str | None = None) -> Engine:
        """The engine for the variant the environment names, warmed up; weights_url is Cog's setup(weights)."""

        def fetched_model_folder(model: str) -> Path:
            # A custom model's configs decide its architecture: fetch the folder before reading them.
            ensure_model_folder(model, weights_url)
            return model_folder(model)

        graphs_setting()  # a mistyped FASTSD_GRAPHS fails setup before any weights load
        variant = variant_from_environment(fetched_model_folder)
        ensure_weights(variant, weights_url)
        engine = cls.load(variant)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One generation per VAE so that the first user does not pay for lazy initialisation.

        At the served default size where it pays (a compiled graph is built per shape, CUDA tunes its
        kernels per shape); small on an uncompiled CPU, where a 512x512 image would cost seconds.
        """
        started = time.perf_counter()
        side = 64 if self.pipelines.device == "cpu" and not pipelines.compile_mode() else None
        for vae in self.pipelines.vae_choices:
            # With graphs, a call of each batch size the plan captures (more images than one request
            # holds come as several requests); without, one image.
            for count in self.graphs.setup_sizes:
                requests = [
                    self.validate(
                        prompt="warm-up",
                        num_inference_steps=1,
                        seed=0,
                        vae=vae,
                        width=side or self.variant.width,
                        height=side or self.variant.height,
                        num_outputs=min(inputs.MAX_OUTPUTS, count - done),
                    )
                    for done in range(0, count, inputs.MAX_OUTPUTS)
                ]
                with self.graphs.capturing():
                    if len(requests) == 1:
                        self.generate(requests[0])
                    else:
                        self.generate_batch(requests)
        log.info("warmed up in %.1f s%s", time.perf_counter() - started,
                 f", graphs captured: {self.graphs.summary()}" if self.graphs.active else "")  # fmt: skip

    def between_requests(self) -> bool:
        """Work for an idle moment (the batch worker asks when its queue is empty): capture one graph
        of a size seen repeatedly. True when there may be more."""
        if not self.graphs.plan.pending:
            return False
        try:
            # Captured as the requests that replay them run: without a user's LoRA (the last request's
            # adapters would otherwise be inside the graph).
            self.adapters.apply(())
            return self.graphs.between_requests()
        except Exception:  # noqa: BLE001 - the worker must live on; the size stays eager
            log.exception("graphs: a capture between requests failed")
            return False

    def validate(self, **raw: Any) -> GenerationRequest:
        if raw.get("vae") is None:
            raw["vae"] = self._default_vae  # the variant's default, or full when TAESD is absent
        wanted = raw.get("controlnet")
        if wanted in CONTROLNETS and wanted not in self.pipelines.controlnets:  # before decoding anything
            served = ", ".join(self.pipelines.controlnets) or "none"
            raise InputError(
                f"controlnet {wanted} is not served by this deployment (it serves: {served}); it is chosen when "
                f"the container starts: {CONTROLNETS_ENV}={','.join((*self.pipelines.controlnets, wanted))}."
            )
        if self._refuses_loras and (raw.get("lora_weights") or raw.get("extra_lora")):  # before any download
            raise InputError(
                "lora_weights and extra_lora are not served by this deployment: it compiles its UNet "
                f"(FASTSD_COMPILE) without LoRA slots ({hotswap.MAX_RANK_ENV}=0)."
            )
        request = inputs.validate(self.variant, **raw)
        if request.vae not in self.pipelines.vae_choices:
            raise InputError(
                f"vae must be one of {', '.join(self.pipelines.vae_choices)} on this deployment, got {request.vae!r}: "
                f"the tiny autoencoder {self.variant.tiny_vae} is not installed."
            )
        # Bad weighting syntax and prompts past the chunk and pass limits are answered before the request
        # queues (the parse is kept for encoding). A LoRA's new tokens are not in the tokenizer yet:
        # those prompts are counted when they are encoded.
        adds_tokens = any(lora.embeddings is not None for lora, _ in request.loras)
        self.prompts.check(request.prompt, self._negative_prompt(request), count_tokens=not adds_tokens)
        return request

    def _negative_prompt(self, request: GenerationRequest) -> str | None:
        if request.negative_prompt and request.uses_guidance and self.pipelines.accepts_negative_prompt:
            return request.negative_prompt
        return None

    def describe(self, request: GenerationRequest) -> list[str]:
        """The log lines for a request: what will run, and any input that will have no effect."""
        recipe = self._recipe_arguments(request, self._accepted[request.mode])
        lines = [
            f"{request.task}: seed {request.seed}, {request.num_inference_steps} step(s), guidance "
            f"{request.guidance_scale:g}, {request.width}x{request.height}, {request.num_outputs} image(s), "
            f"vae {request.vae}"
            + (f", strength {request.strength:g}" if request.task is not Task.TEXT_TO_IMAGE else "")
            + (f", mask {_share(request.mask):.0%} of the image" if request.task is Task.INPAINTING else "")
            + (f", controlnet {request.controlnet} at {request.conditioning_scale:g}" if request.controlnet else "")
            + "".join(f", LoRA {lora.reference} at {scale:g}" for lora, scale in request.loras)
            + "".join(f", {name} {value}" for name, value in recipe.items())
        ]
        if request.negative_prompt and not self.pipelines.accepts_negative_prompt:
            lines.append(f"negative_prompt ignored: {self.variant.name} embeds guidance and takes no negative prompt")
        elif request.negative_prompt and not request.uses_guidance:
            lines.append(
                f"negative_prompt ignored: guidance_scale {request.guidance_scale:g} <= 1 switches "
                "classifier-free guidance off"
            )
        return lines

    def _recipe_arguments(self, request: GenerationRequest, accepted: set[str]) -> dict[str, Any]:
        """What the recipe's sampler takes at call time: TCD's eta, DMD2's fixed timesteps (for the
        step count they were trained for; another count gets the scheduler's own spacing)."""
        scheduler = self.variant.recipe.scheduler
        arguments: dict[str, Any] = {}
        if scheduler.eta is not None and "eta" in accepted:
            arguments["eta"] = scheduler.eta
        if scheduler.timesteps and len(scheduler.timesteps) == request.num_inference_steps and "timesteps" in accepted:
            arguments["timesteps"] = list(scheduler.timesteps)
        return arguments

    def generate(self, request: GenerationRequest) -> Result:
        """One request on its own (scripts, tests, the warm-up)."""
        for line in self.describe(request):
            log.info(line)
        return self.generate_batch([request])[0]

    def _by_prompt_length(self, requests, encoded, interrupted) -> list[Result]:
        """Requests whose prompts take different numbers of 77-token chunks run as one call per
        length: padding the shorter embeddings would change their images (docs/prompts.md)."""
        groups: dict[int, list[int]] = {}
        for index, embeddings in enumerate(encoded):
            groups.setdefault(embeddings["prompt_embeds"].shape[1], []).append(index)
        results: list[Result | None] = [None] * len(requests)
        for indices in groups.values():
            ran = self.generate_batch([requests[i] for i in indices], interrupted)
            for index, result in zip(indices, ran, strict=True):
                results[index] = result
        return results

    def generate_batch(
        self, requests: Sequence[GenerationRequest], interrupted: Callable[[], bool] | None = None
    ) -> list[Result]:
        """Requests with one batch_key as one pipeline call: each image gets its request's prompt
        embeddings and its own generator (seed + i), so a request draws what it draws alone.
        interrupted() is asked after every step; when it says so the call stops (Interrupted)."""
        first = requests[0]
        if any(batch_key(request) != batch_key(first) for request in requests):
            raise ValueError("requests of one batch must share a batch_key")
        pipeline, accepted = self.pipelines.get(*first.mode), self._accepted[first.mode]
        started = time.perf_counter()
        guidance = first.uses_guidance and self.pipelines.accepts_negative_prompt
        self.graphs.use(not first.loras)  # a user's LoRA runs eagerly: its layers are in no graph
        self.adapters.apply(first.loras)
        # LoRAs that change the text encoders encode the same prompt differently; so do those that
        # bring tokens (a prompt sent before they were added, naming them, was encoded without them).
        encoding = tuple(
            (lora.adapter, scale) for lora, scale in first.loras if lora.text_encoder or lora.embeddings is not None
        )
        encoded = [self.prompts.get(r.prompt, self._negative_prompt(r), guidance, encoding) for r in requests]
        if len({embeddings["prompt_embeds"].shape[1] for embeddings in encoded}) > 1:
            return self._by_prompt_length(requests, encoded, interrupted)
        counts = [request.num_outputs for request in requests]
        embeddings = {
            name: torch.cat([e[name].repeat_interleave(n, dim=0) for e, n in zip(encoded, counts, strict=True)])
            for name in encoded[0]
            if name in accepted
        }
        arguments = dict(
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            num_images_per_prompt=1,
            # One CPU generator per image: image i is reproducible alone with seed + i, on any device.
            generator=[torch.Generator("cpu").manual_seed(r.seed + i) for r in requests for i in range(r.num_outputs)],
            **embeddings,
            **self._recipe_arguments(first, accepted),
        )
        if first.task is Task.TEXT_TO_IMAGE:
            arguments.update(width=first.width, height=first.height)
        else:
            arguments.update(image=[r.image for r in requests for _ in range(r.num_outputs)], strength=first.strength)
        if first.task is Task.INPAINTING:
            masks = [r.mask for r in requests for _ in range(r.num_outputs)]
            arguments.update(mask_image=masks, width=first.width, height=first.height)
        if first.controlnet:
            controls = [r.control_image for r in requests for _ in range(r.num_outputs)]
            # Text-to-image takes the map as `image`; image-to-image keeps `image` for the start.
            arguments["image" if first.task is Task.TEXT_TO_IMAGE else "control_image"] = controls
            arguments["controlnet_conditioning_scale"] = first.conditioning_scale
        if interrupted is not None and "callback_on_step_end" in accepted:

            def stop_when_asked(pipe, step, timestep, callback_kwargs):
                if interrupted():
                    raise Interrupted()
                return callback_kwargs

            arguments["callback_on_step_end"] = stop_when_asked
        images_in_call = sum(counts)
        if self.graphs.active:
            arguments["output_type"] = "pt"  # kept on the device until encoded (fastsd.gpu.postprocess)
        try:
            with torch.inference_mode():
                generated = pipeline(**arguments).images
                generated = postprocess.as_uint8(generated) if self.graphs.active else generated
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RuntimeError(
                f"Out of memory for {images_in_call} image(s) of {first.width}x{first.height}; "
                "ask for fewer or smaller images."
            ) from None
        seconds = time.perf_counter() - started
        if self.graphs.active:
            started = time.perf_counter()  # the safety check, with the composite and the host copy
            frames, withheld = self._finish_on_device(requests, generated, counts)
            safety_time = time.perf_counter() - started
            by_request = _split(frames.images, counts)
        else:
            frames = None
            by_request = [
                [images.keep_unmasked(request.image, image, request.mask) for image in mine]
                if request.task is Task.INPAINTING
                else mine
                for request, mine in zip(requests, _split(generated, counts), strict=True)
            ]
            started = time.perf_counter()
            withheld = self._withheld(requests, by_request)
            safety_time = time.perf_counter() - started
        results = []
        offset = 0
        for request, mine, flags in zip(requests, by_request, withheld, strict=True):
            kept = [image for image, flag in zip(mine, flags, strict=True) if not flag]
            result = Result(kept, request.seed, seconds, batch_size=images_in_call, withheld=len(mine) - len(kept))
            result.timings["safety_time"] = safety_time
            if frames and frames.on_device is not None:
                result.on_device = frames.on_device[[offset + i for i, flag in enumerate(flags) if not flag]]
            offset += len(mine)
            results.append(result)
        return results

    def _finish_on_device(
        self, requests: Sequence[GenerationRequest], generated: torch.Tensor, counts: list[int]
    ) -> tuple[postprocess.Frames, list[list[bool]]]:
        """The call's uint8 images on the device: inpainting's composite and the safety models'
        preprocessing there, then one copy to the host."""
        on_device = list(generated.split(counts))
        with torch.inference_mode():
            for index, request in enumerate(requests):
                if request.task is Task.INPAINTING:
                    on_device[index] = postprocess.keep_unmasked(request.image, on_device[index], request.mask)
            withheld = self._withheld(requests, on_device)
            composited = torch.cat(on_device) if requests[0].task is Task.INPAINTING else generated
            return postprocess.to_frames(composited), withheld

    def _withheld(self, requests: Sequence[GenerationRequest], by_request: list[list]) -> list[list[bool]]:
        """Per request, per image: withheld by the safety checker. One batched check for the call."""
        checked = [
            image for request, mine in zip(requests, by_request, strict=True) if request.check_safety for image in mine
        ]
        if checked and self.pipelines.safety is None:
            log.warning("safety checking is off on this deployment: %d image(s) returned unchecked", len(checked))
        flags = iter(self.pipelines.safety.withheld(checked) if checked and self.pipelines.safety else [])
        return [
            [next(flags) if request.check_safety and self.pipelines.safety else False for _ in mine]
            for request, mine in zip(requests, by_request, strict=True)
        ]

    KEPT_OUTPUT_FOLDERS = 64  # several times the slots: Cog has read a request's files long before

    def _output_folder(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self._output_root))
        with self._output_lock:
            self._output_dirs.append(folder)
            stale = [self._output_dirs.popleft() for _ in range(len(self._output_dirs) - self.KEPT_OUTPUT_FOLDERS)]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def save(self, result: Result, request: GenerationRequest) -> list[Path]:
        """Encode the images into a folder of this request's own (Cog reads them after run()).
        A request whose every image the safety checker withheld fails here, saying so."""
        if result.withheld and not result.images:
            count = "the image" if result.withheld == 1 else f"all {result.withheld} images"
            raise ContentWithheld(
                f"The safety checker withheld {count} of this request as NSFW; try another prompt or seed."
            )
        started = time.perf_counter()
        folder = self._output_folder()
        targets = [folder / f"output-{i}.{request.output_format}" for i in range(len(result.images))]
        if result.on_device is not None and request.output_format == "jpg":  # nvJPEG, on the GPU
            encoded = postprocess.encode_jpeg(result.on_device, request.output_quality)
            for target, data in zip(targets, encoded, strict=True):
                target.write_bytes(data)
            result.timings["encode_time"] = time.perf_counter() - started
            return targets
        # Pillow's encoders release the GIL: a batch encodes in parallel on the host's cores.
        paths = list(
            self._encoders.map(
                lambda pair: images.save(pair[0], pair[1], request.output_format, request.output_quality),
                zip(result.images, targets, strict=True),
            )
        )
        result.timings["encode_time"] = time.perf_counter() - started
        return paths
