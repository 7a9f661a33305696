"""Request -> images: seeding, batching and the image-to-image call, on pipelines built once."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import images, inputs, pipelines
from .inputs import GenerationRequest
from .variants import Variant, variant_from_environment
from .weights import ensure_weights, model_folder

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: list[Image.Image]
    seed: int
    inference_time: float  # seconds in the diffusers call: prompt encoding, steps, decoding
    timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """One variant's pipelines, loaded once, and the per-request path."""

    def __init__(self, variant: Variant, loaded: pipelines.Pipelines):
        self.variant = variant
        self.pipelines = loaded
        self._output_dir = Path(tempfile.mkdtemp(prefix="fastsd-outputs-"))

    @classmethod
    def load(cls, variant: Variant, device: str | None = None, dtype: torch.dtype | None = None) -> "Engine":
        return cls(variant, pipelines.load(variant, device, dtype))

    @classmethod
    def from_environment(cls, weights_url: str | None = None) -> "Engine":
        """The engine for the variant the environment names; weights_url is Cog's setup(weights)."""
        variant = variant_from_environment(model_folder)
        ensure_weights(variant, weights_url)
        return cls.load(variant)

    def validate(self, **raw: Any) -> GenerationRequest:
        return inputs.validate(self.variant, **raw)

    def generate(self, request: GenerationRequest) -> Result:
        arguments = dict(
            prompt=request.prompt, num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, num_images_per_prompt=request.num_outputs,
            # One CPU generator per image: image i is reproducible alone with seed + i, on any device.
            generator=[torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_outputs)],
        )
        if request.negative_prompt:
            if not self.pipelines.accepts_negative_prompt:
                log.info("negative_prompt ignored: %s embeds guidance and takes no negative prompt", self.variant.name)
            elif not request.uses_guidance:
                log.info("negative_prompt ignored: guidance_scale %.3g <= 1 switches classifier-free guidance off",
                         request.guidance_scale)
            else:
                arguments["negative_prompt"] = request.negative_prompt
        if request.image is None:
            pipeline = self.pipelines.text_to_image
            arguments.update(width=request.width, height=request.height)
        else:
            pipeline = self.pipelines.image_to_image
            arguments.update(image=request.image, strength=request.strength)

        log.info("seed %d, %d step(s), guidance %.3g, %dx%d, %d image(s)%s", request.seed,
                 request.num_inference_steps, request.guidance_scale, request.width, request.height,
                 request.num_outputs, f", image-to-image strength {request.strength:g}" if request.image else "")
        started = time.perf_counter()
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
        extension = request.output_format
        paths = [
            images.save(image, self._output_dir / f"output-{i}.{extension}", request.output_format,
                        request.output_quality)
            for i, image in enumerate(result.images)
        ]
        result.timings["encode_time"] = time.perf_counter() - started
        return paths
