"""Request -> images: seeding, batching and the image-to-image call, on pipelines built once."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import images, inputs, pipelines
from .errors import InputError
from .inputs import GenerationRequest
from .layout import model_folder
from .provision import ensure_model_folder, ensure_weights
from .tasks import Task
from .variants import FULL_VAE, Variant, variant_from_environment

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: list[Image.Image]
    seed: int
    inference_time: float  # seconds in the diffusers call: prompt encoding, steps, decoding
    timings: dict[str, float] = field(default_factory=dict)


class PromptCache:
    """Encoded prompts for the most recent (prompt, negative prompt, guidance) requests.

    The realtime case sends the same prompt with every new frame or seed: the text encoders then
    run once, not per request. Bounded, least recently used out first.
    """

    _OUTPUT_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

    def __init__(self, pipeline, device: str, capacity: int = 32):
        self._pipeline = pipeline
        self._device = device
        self._capacity = capacity
        self._entries: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()

    def get(self, prompt: str, negative_prompt: str | None, guidance: bool) -> dict[str, torch.Tensor]:
        key = (prompt, negative_prompt, guidance)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        with torch.inference_mode():
            encoded = self._pipeline.encode_prompt(
                prompt=prompt,
                device=self._device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=negative_prompt,
            )
        # SD pipelines return two tensors, SDXL four (with the pooled embeddings): zip stops at the shorter.
        named = zip(self._OUTPUT_NAMES, encoded, strict=False)
        embeddings = {name: tensor for name, tensor in named if tensor is not None}
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
        self._output_dir = Path(tempfile.mkdtemp(prefix="fastsd-outputs-"))
        self._encoders = ThreadPoolExecutor(max_workers=min(inputs.MAX_OUTPUTS, os.cpu_count() or 1))
        self._accepted = {
            mode: set(inspect.signature(pipeline.__call__).parameters) for mode, pipeline in loaded.by_mode.items()
        }
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
            request = self.validate(
                prompt="warm-up",
                num_inference_steps=1,
                seed=0,
                vae=vae,
                width=side or self.variant.width,
                height=side or self.variant.height,
            )
            self.generate(request)
        log.info("warmed up in %.1f s", time.perf_counter() - started)

    def validate(self, **raw: Any) -> GenerationRequest:
        if raw.get("vae") is None:
            raw["vae"] = self._default_vae  # the variant's default, or full when TAESD is absent
        request = inputs.validate(self.variant, **raw)
        if request.vae not in self.pipelines.vae_choices:
            raise InputError(
                f"vae must be one of {', '.join(self.pipelines.vae_choices)} on this deployment, got {request.vae!r}: "
                f"the tiny autoencoder {self.variant.tiny_vae} is not installed."
            )
        return request

    def _negative_prompt(self, request: GenerationRequest) -> str | None:
        if not request.negative_prompt:
            return None
        if not self.pipelines.accepts_negative_prompt:
            log.info("negative_prompt ignored: %s embeds guidance and takes no negative prompt", self.variant.name)
        elif not request.uses_guidance:
            log.info(
                "negative_prompt ignored: guidance_scale %.3g <= 1 switches classifier-free guidance off",
                request.guidance_scale,
            )
        else:
            return request.negative_prompt
        return None

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
        mode = (request.task, request.vae)
        pipeline, accepted = self.pipelines.get(*mode), self._accepted[mode]
        started = time.perf_counter()
        guidance = request.uses_guidance and self.pipelines.accepts_negative_prompt
        embeddings = self.prompts.get(request.prompt, self._negative_prompt(request), guidance)
        arguments = dict(
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_outputs,
            # One CPU generator per image: image i is reproducible alone with seed + i, on any device.
            generator=[torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_outputs)],
            **{name: tensor for name, tensor in embeddings.items() if name in accepted},
            **self._recipe_arguments(request, accepted),
        )
        if request.task is Task.TEXT_TO_IMAGE:
            arguments.update(width=request.width, height=request.height)
        else:
            arguments.update(image=request.image, strength=request.strength)

        log.info(
            "%s: seed %d, %d step(s), guidance %.3g, %dx%d, %d image(s), vae %s%s%s",
            request.task,
            request.seed,
            request.num_inference_steps,
            request.guidance_scale,
            request.width,
            request.height,
            request.num_outputs,
            request.vae,
            f", strength {request.strength:g}" if request.task is Task.IMAGE_TO_IMAGE else "",
            "".join(f", {name} {value}" for name, value in arguments.items() if name in ("eta", "timesteps")),
        )
        try:
            with torch.inference_mode():
                generated = pipeline(**arguments).images
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RuntimeError(
                f"Out of memory for {request.num_outputs} image(s) of {request.width}x{request.height}; "
                "ask for fewer or smaller images."
            ) from None
        return Result(generated, request.seed, time.perf_counter() - started)

    def save(self, result: Result, request: GenerationRequest) -> list[Path]:
        """Encode the images into files that live until the next request (Cog reads them after run())."""
        shutil.rmtree(self._output_dir, ignore_errors=True)
        self._output_dir.mkdir(parents=True)
        started = time.perf_counter()
        targets = [self._output_dir / f"output-{i}.{request.output_format}" for i in range(len(result.images))]
        # Pillow's encoders release the GIL: a batch encodes in parallel on the host's cores.
        paths = list(
            self._encoders.map(
                lambda pair: images.save(pair[0], pair[1], request.output_format, request.output_quality),
                zip(result.images, targets, strict=True),
            )
        )
        result.timings["encode_time"] = time.perf_counter() - started
        return paths
