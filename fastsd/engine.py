"""Requests -> images on pipelines built once: one pipeline call for a batch of requests that can
share it (fastsd.batching decides which do). The per-call path is generate_batch, in numbered steps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import call, inputs, pipelines
from .families import Family, family_of, join_embeddings, length_of
from .finish import DeviceFinish, Finish
from .gpu import Graphs
from .inputs import GenerationRequest, Served
from .loras.adapters import Adapters, denoiser_label
from .loras.references import Rules
from .outputs import Outputs
from .prompts import PromptCache
from .results import Interrupted, Result
from .settings import REGIONAL, Settings
from .tasks import Task
from .variants import Variant, variant_for
from .weights.layout import model_folder
from .weights.provision import ensure_model_folder, ensure_weights

log = logging.getLogger(__name__)
__all__ = ["Engine", "Interrupted", "Result", "batch_key", "lora_refusal_of"]


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with the same key can run as one pipeline call (prompts, seeds and output formats
    may differ: each image gets its own embeddings and generator)."""
    strength = None if request.task is Task.TEXT_TO_IMAGE else request.strength
    scale = request.conditioning_scale if request.controlnet else None
    loras = tuple((lora.adapter, lora_scale) for lora, lora_scale in request.loras)
    return (*request.pipeline_key, request.width, request.height, request.num_inference_steps,
            request.guidance_scale, strength, scale, loras, request.references_digest)  # fmt: skip


def lora_refusal_of(loaded: pipelines.Pipelines, family: Family) -> str | None:
    """Why this deployment serves no user LoRAs, or None when it does: a compiled denoiser takes
    them only through its slots, fp8 weights not at all."""
    if loaded.fp8:
        return ("lora_weights and extra_lora are not served by this deployment: its transformer's weights are fp8 "
                "(FASTSD_FP8), and users' LoRAs load only on bf16 weights.")  # fmt: skip
    if loaded.compile_mode is None or loaded.lora_slots is not None:
        return None
    denoiser = denoiser_label(family.denoiser)
    return (f"lora_weights and extra_lora are not served by this deployment: it compiles its {denoiser} "
            "(FASTSD_COMPILE) without LoRA slots (FASTSD_LORA_MAX_RANK=0).")  # fmt: skip


class Engine:
    """One variant's pipelines, loaded once, and the per-request path."""

    def __init__(self, variant: Variant, loaded: pipelines.Pipelines, settings: Settings | None = None):
        settings = settings or Settings()
        self.variant = variant
        self.pipelines = loaded
        self.family = family_of(variant.architecture)
        self.prompts = PromptCache(self.family.prompts(loaded.text_to_image, loaded.device, variant))
        self.adapters = Adapters(
            loaded.text_to_image, variant, loaded.lora_slots, settings.loras_loaded, self.family.denoiser
        )
        # FASTSD_GRAPHS=on: the hot modules replay captured graphs (fastsd.gpu); off: nothing installed.
        # A whole-model compile brings its own graphs; regional compilation's blocks go inside ours.
        whole_compile = loaded.compile_mode not in (None, REGIONAL)
        graphs = settings.graphs and variant.has_unet
        if settings.graphs and not graphs:
            log.info("graphs: FASTSD_GRAPHS=on covers the UNet presets; %s runs eagerly", variant.name)
        self.graphs = Graphs.for_pipelines(loaded, variant.max_batch_images, whole_compile, graphs)
        # On CUDA the images stay on the GPU until encoded (uint8, composite, safety preprocessing there).
        on_device = self.graphs.active or loaded.device == "cuda"
        self.finish: Finish = DeviceFinish(loaded.safety) if on_device else Finish(loaded.safety)
        self.outputs = Outputs()
        self.call_parameters = {key: pipelines.call_parameters(pipeline) for key, pipeline in loaded.by_key.items()}
        lora_refusal = lora_refusal_of(loaded, self.family)
        self.served = Served(
            variant,
            vae_choices=loaded.vae_choices,
            controlnets=loaded.controlnets,
            lora_rules=None if lora_refusal else Rules.from_settings(settings),
            lora_refusal=lora_refusal or Served.lora_refusal,
            accepts_negative_prompt=loaded.accepts_negative_prompt,
            check_prompts=self.prompts.check,
        )
        if self.served.default_vae != variant.default_vae:
            log.info("vae %s is the default for %s but %s is not installed: using the full VAE",
                     variant.default_vae, variant.name, variant.tiny_vae)  # fmt: skip

    @classmethod
    def load(cls, variant: Variant, settings: Settings, device: str | None = None, dtype: torch.dtype | None = None):
        return cls(variant, pipelines.load(variant, settings, device, dtype), settings)

    @classmethod
    def from_settings(cls, settings: Settings, weights_url: str | None = None) -> Engine:
        """The engine for the variant the settings name, weights fetched where missing, warmed up;
        weights_url is Cog's setup(weights)."""

        def fetched_model_folder(model: str) -> Path:
            # A custom model's configs decide its architecture: fetch the folder before reading them.
            ensure_model_folder(model, settings, weights_url)
            return model_folder(settings.weights_root, model)

        variant = variant_for(settings, fetched_model_folder)
        ensure_weights(variant, settings, weights_url)
        engine = cls.load(variant, settings)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One generation per VAE so that the first user does not pay for lazy initialisation: at the
        served default size where it pays (compiled graphs and CUDA's kernels are chosen per shape),
        small on an uncompiled CPU; with graphs, a call of each batch size the plan captures."""
        started = time.perf_counter()
        side = 64 if self.pipelines.device == "cpu" and not self.pipelines.compile_mode else None
        for vae in self.pipelines.vae_choices:
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
                    )  # fmt: skip
                    for done in range(0, count, inputs.MAX_OUTPUTS)
                ]
                with self.graphs.capturing():
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
        """The one validation path (fastsd.inputs), with what this deployment serves."""
        return inputs.validate(self.served, **raw)

    def describe(self, request: GenerationRequest) -> list[str]:
        """The log lines for a request: what will run, and any input that will have no effect."""
        accepted = self.call_parameters[request.pipeline_key]
        recipe = call.recipe_arguments(self.variant.recipe.scheduler, request.num_inference_steps, accepted)
        lines = [call.describe(request, recipe), *self.prompts.notes(request.prompt, request.negative_prompt)]
        if request.negative_prompt and not self.served.accepts_negative_prompt:
            lines.append(f"negative_prompt ignored: {self.variant.name} embeds guidance and takes no negative prompt")
        elif request.negative_prompt and not request.uses_guidance:
            lines.append(f"negative_prompt ignored: guidance_scale {request.guidance_scale:g} <= 1 switches "
                         "classifier-free guidance off")  # fmt: skip
        return lines

    def generate(self, request: GenerationRequest) -> Result:
        """One request on its own (scripts, tests)."""
        for line in self.describe(request):
            log.info(line)
        return self.generate_batch([request])[0]

    def save(self, result: Result, request: GenerationRequest) -> list[Path]:
        return self.outputs.save(result, request)

    def generate_batch(
        self, requests: Sequence[GenerationRequest], interrupted: Callable[[], bool] | None = None
    ) -> list[Result]:
        """Requests with one batch_key as one pipeline call: each image gets its request's prompt
        embeddings and its own generator (seed + i), so a request draws what it draws alone.
        interrupted() is asked after every step; when it says so the call stops (Interrupted)."""
        first = requests[0]
        if any(batch_key(request) != batch_key(first) for request in requests):
            raise ValueError("requests of one batch must share a batch_key")
        pipeline, accepted = self.pipelines.get(*first.pipeline_key), self.call_parameters[first.pipeline_key]
        started = time.perf_counter()
        # 1. The request's LoRAs, and graphs or eager (a user's LoRA runs eagerly: its layers are in no graph).
        self.graphs.use(not first.loras)
        self.adapters.apply(first.loras)
        # 2. The prompts, encoded (cached); requests of different prompt lengths run as one call each.
        encoded = [self._encoded(request) for request in requests]
        if len({length_of(embeddings) for embeddings in encoded}) > 1:
            return self._by_prompt_length(requests, encoded, interrupted)
        counts = [request.num_outputs for request in requests]
        embeddings = join_embeddings(encoded, counts, accepted)
        # 3. The call's arguments: per-image generators and inputs, the task's (the family's), the recipe's.
        arguments = call.arguments(
            requests, embeddings, accepted, self.variant.recipe.scheduler, interrupted,
            lambda generators: self.family.task_arguments(requests, pipeline, accepted, generators),
        )  # fmt: skip
        arguments["output_type"] = self.finish.output_type
        # 4. The call.
        generated = self._run(pipeline, arguments, sum(counts), first)
        seconds = time.perf_counter() - started
        # 5. The finish: inpainting's composite, the safety check, the images on the host.
        started = time.perf_counter()
        finished = self.finish(requests, generated, counts)
        safety_time = time.perf_counter() - started
        # 6. Each request's own images.
        results, offset = [], 0
        for request, mine, flags in zip(requests, finished.images, finished.withheld, strict=True):
            kept = [image for image, flag in zip(mine, flags, strict=True) if not flag]
            result = Result(kept, request.seed, seconds, batch_size=sum(counts), withheld=len(mine) - len(kept))
            result.timings["safety_time"] = safety_time
            if finished.on_device is not None:
                result.on_device = finished.on_device[[offset + i for i, flag in enumerate(flags) if not flag]]
            offset += len(mine)
            results.append(result)
        return results

    def _encoded(self, request: GenerationRequest) -> dict[str, Any]:
        """The request's embeddings. LoRAs that change the text encoders encode the same prompt
        differently; so do those that bring tokens (a prompt sent before they were added, naming
        them, was encoded without them): they are part of the cache's key."""
        encoding = tuple((lora.adapter, scale) for lora, scale in request.loras
                         if lora.text_encoder or lora.embeddings is not None)  # fmt: skip
        guidance = request.uses_guidance and self.served.accepts_negative_prompt
        return self.prompts.get(request.prompt, self.served.negative_prompt(request), guidance, encoding)

    def _run(self, pipeline, arguments: dict[str, Any], images: int, first: GenerationRequest):
        try:
            with torch.inference_mode():
                return pipeline(**arguments).images
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RuntimeError(
                f"Out of memory for {images} image(s) of {first.width}x{first.height}; ask for fewer or smaller images."
            ) from None

    def _by_prompt_length(self, requests, encoded, interrupted) -> list[Result]:
        """Requests whose prompts take different numbers of 77-token chunks run as one call per
        length: padding the shorter embeddings would change their images (docs/prompts.md)."""
        groups: dict[int, list[int]] = {}
        for index, embeddings in enumerate(encoded):
            groups.setdefault(length_of(embeddings), []).append(index)
        results: list[Result | None] = [None] * len(requests)
        for indices in groups.values():
            for index, result in zip(indices, self.generate_batch([requests[i] for i in indices], interrupted),
                                     strict=True):  # fmt: skip
                results[index] = result
        return [result for result in results if result is not None]
