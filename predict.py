"""The Cog interface, and nothing else: typed inputs with their descriptions, and calls into fastsd.

Cog reads this file's source to build the input schema without importing it, so every default,
choice and description below is a literal, and so is the concurrency: up to 16 predictions in
flight (the image's default; COG_MAX_CONCURRENCY overrides it when the container starts). Requests
that arrive while the model is busy wait in fastsd's queue, and those that can share a pipeline
call run together (fastsd.batching). Twice the clients one expects: Cog frees a slot a moment
after it replies, so a client that sends again at once briefly holds two.
"""

import asyncio
import contextlib
import logging
import sys

import cog
from cog import BaseRunner, Input, Path

from fastsd.batching import Batcher
from fastsd.engine import Engine
from fastsd.errors import InputError
from fastsd.metrics import ServerMetrics
from fastsd.settings import Settings

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)


class Predictor(BaseRunner):
    def setup(self, weights: str | None = None) -> None:
        settings = Settings.from_environment()  # every FASTSD_* variable, checked once (docs/settings.md)
        self.engine = Engine.from_settings(settings, weights_url=weights)
        self.batcher = Batcher(self.engine)
        if settings.metrics_port:  # the queue, for an autoscaler (docs/deploy.md)
            ServerMetrics(self.batcher).serve(settings.metrics_port)
        # A decoded input image takes up to 160 MB before it is fitted: two decodes at a time.
        self.decoding = asyncio.Semaphore(2)

    @cog.concurrent(max=16)
    async def run(
        self,
        prompt: str = Input(
            description="What the image should show. Weighting: (words:1.3) multiplies their weight by 1.3, "
            "(words) by 1.1, ((words)) by 1.21, [words] divides it by 1.1; compel's words+, words-, (words)1.3, "
            '("a", "b").blend(0.7, 0.3) and .and() work too; \\( and \\) are literal parentheses. Past 77 tokens '
            "the prompt is encoded in 77-token chunks, up to 8 (about 600 tokens), none of it dropped. FLUX and "
            "Z-Image read up to 512 tokens (FLUX.1 schnell: 256) and encode weighted words without their weights.",
        ),
        negative_prompt: str = Input(
            default="",
            description="What the image should not show, with the prompt's weighting and length rules. Used only "
            "when guidance_scale is above 1 (LCM and turbo run without guidance by default).",
        ),
        image: Path | None = Input(
            default=None,
            description="A starting image (PNG, JPEG, WebP, GIF, BMP or TIFF) for image-to-image. Without width and "
            "height the output keeps its size, rounded to a multiple of 8. Transparent pixels (with no mask) are "
            "filled in: outpainting.",
        ),
        mask: Path | None = Input(
            default=None,
            description="Inpainting: an image the size of image (or resized to it) where white repaints and black "
            "keeps; grey blends. The kept pixels come back unchanged.",
        ),
        reference_images: list[Path] | None = Input(
            default=None,
            description="FLUX.2 klein only: up to 4 images to edit from or combine (URLs or data URIs), each read at "
            "up to 1 megapixel; the prompt says what to make of them. Without width and height the output takes the "
            "model's default size.",
        ),
        strength: float = Input(
            default=0.8,
            ge=0.0,
            le=1.0,
            description="Image-to-image only: how much to change the starting image, from 0 (keep it) to 1 "
            "(replace it). strength x num_inference_steps must reach 1.",
        ),
        num_inference_steps: int | None = Input(
            default=None,
            ge=1,
            le=100,
            description="Denoising steps. Leave empty for the model's default (1 for turbo, 4 for LCM, FLUX.1 "
            "schnell and FLUX.2 klein, 9 for Z-Image-Turbo, 25 for the base models); image-to-image then raises it "
            "so that strength x steps keeps that many.",
        ),
        guidance_scale: float | None = Input(
            default=None,
            ge=0.0,
            le=20.0,
            description="Classifier-free guidance. 1 or less switches it off (the right choice for turbo and "
            "LCM-LoRA); leave empty for the model's default. FLUX.1 schnell and FLUX.2 klein are distilled without "
            "it and take no other value.",
        ),
        width: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Output width in pixels, a multiple of 8 (16 for FLUX and Z-Image). Leave empty for the "
            "model's default (512, or 1024 for SDXL base models, FLUX and Z-Image) or, with an image, for its width.",
        ),
        height: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Output height in pixels, a multiple of 8 (16 for FLUX and Z-Image). Leave empty for the "
            "model's default or, with an image, for its height.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=8, description="How many images to make in one batch (1 to 8)."),
        seed: int | None = Input(
            default=None,
            ge=0,
            le=4294967295,
            description="Random seed for reproducible images; image i of a batch uses seed + i. Leave empty "
            "for a random seed (it is logged and returned in the metrics).",
        ),
        output_format: str = Input(
            default="webp", choices=["webp", "jpg", "png"], description="File format of the output images."
        ),
        vae: str | None = Input(
            default=None,
            choices=["full", "tiny"],
            description="Decoder for the final image: full (finest detail) or tiny (TAESD, TAEF1 or FLUX.2's tiny "
            "autoencoder: 10x less work, slightly softer detail). Leave empty for the model's default: tiny for the "
            "1-step turbo models, full otherwise.",
        ),
        output_quality: int = Input(
            default=80,
            ge=1,
            le=100,
            description="Quality of webp and jpg outputs, from 1 to 100 (png is lossless and ignores it).",
        ),
        control_image: Path | None = Input(
            default=None,
            description="ControlNet: the image to follow, with controlnet. For canny a photo or drawing (its edges "
            "are found) or an edge map (control_preprocess false); for depth a depth map (near is white). Sets the "
            "size when there is no image and no width and height.",
        ),
        controlnet: str | None = Input(
            default=None,
            choices=["canny", "depth"],
            description="Which ControlNet follows control_image: canny (edges) or depth. The deployment serves those "
            "FASTSD_CONTROLNETS names.",
        ),
        controlnet_conditioning_scale: float | None = Input(
            default=None,
            ge=0.0,
            le=2.0,
            description="How closely the image follows control_image, from 0 to 2. Leave empty for the models' "
            "recommendation: 1 for SD1.5 and SD2.1 models, 0.5 for SDXL ones.",
        ),
        control_preprocess: bool = Input(
            default=True,
            description="canny only: find the edges of control_image (Canny, thresholds 100 and 200). False when "
            "control_image already is an edge map. Depth maps are always used as they are.",
        ),
        lora_weights: str | None = Input(
            default=None,
            description="A LoRA to apply for this request, on top of the model's own acceleration: an https URL of a "
            ".safetensors file (Civitai, a Hugging Face resolve link), a Hugging Face repo id (owner/name or "
            "owner/name/file.safetensors), or the URL of a Replicate LoRA training's .tar (its trigger tokens then "
            "work in the prompt) or of a Replicate FLUX training. It must be made for the model's base (SD 1.5, "
            "SD 2.x, SDXL, FLUX.1, FLUX.2 klein or Z-Image). Pickles are refused.",
        ),
        lora_scale: float = Input(
            default=1.0, ge=0.0, le=2.0, description="Strength of lora_weights, from 0 (off) to 2."
        ),
        extra_lora: str | None = Input(
            default=None, description="A second LoRA applied together with lora_weights, named the same way."
        ),
        extra_lora_scale: float = Input(
            default=1.0, ge=0.0, le=2.0, description="Strength of extra_lora, from 0 (off) to 2."
        ),
        disable_safety_checker: bool = Input(
            default=False,
            description="Return images without safety checking. By default an image that both the Stable Diffusion "
            "safety checker and an NSFW classifier flag is left out (metrics: withheld).",
        ),
    ) -> list[Path]:
        pictures = [("image", image), ("mask", mask), ("control_image", control_image)]
        pictures += [("reference_images", value) for value in reference_images or ()]
        for name, value in pictures:
            if value is not None and not isinstance(value, Path):
                # Cog turns URLs and data URIs into downloaded files (Path); without a build schema it
                # passes any other string through as is. A bare path would read this machine's files.
                raise InputError(f"{name} must be an http(s) URL or a data URI of an image, not a file path.")
        # Decoding an input image takes a while: off the event loop, where other requests wait.
        has_images = any(value is not None for _, value in pictures)
        async with self.decoding if has_images else contextlib.nullcontext():
            request = await asyncio.to_thread(
                self.engine.validate,
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=image,
                mask=mask,
                reference_images=reference_images,
                strength=strength,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                width=width,
                height=height,
                num_outputs=num_outputs,
                seed=seed,
                output_format=output_format,
                output_quality=output_quality,
                vae=vae,
                control_image=control_image,
                controlnet=controlnet,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_preprocess=control_preprocess,
                lora_weights=lora_weights,
                lora_scale=lora_scale,
                extra_lora=extra_lora,
                extra_lora_scale=extra_lora_scale,
                disable_safety_checker=disable_safety_checker,
            )
        for line in self.engine.describe(request):
            logging.info(line)
        result = await self.batcher.run(request)
        # Recorded before saving: a request whose every image was withheld fails there.
        self.record_metric("seed", result.seed)
        self.record_metric("batch_size", result.batch_size)
        self.record_metric("withheld", result.withheld)
        self.record_metric("queue_time", round(result.timings["queue_time"], 4))
        self.record_metric("inference_time", round(result.inference_time, 4))
        self.record_metric("safety_time", round(result.timings["safety_time"], 4))
        if result.withheld:
            logging.info("the safety checker withheld %d of %d image(s)", result.withheld, request.num_outputs)
        if result.batch_size > request.num_outputs:
            logging.info("ran in a batch of %d images with other requests", result.batch_size)
        paths = await asyncio.to_thread(self.engine.save, result, request)
        self.record_metric("encode_time", round(result.timings["encode_time"], 4))
        return [Path(path) for path in paths]
