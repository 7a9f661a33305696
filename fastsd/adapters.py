"""Users' LoRAs as adapters next to the preset's fused acceleration, switched per pipeline call.

The acceleration (LCM-LoRA, Hyper-SD, ...) is fused into the weights at setup and costs nothing per
step. A request's own LoRAs (fastsd.loras resolves and checks the files) are loaded as peft
adapters through diffusers, which reads the key formats people publish (kohya, diffusers, peft),
text-encoder layers included. The most recent few stay loaded; a call without LoRAs runs with
every adapter disabled, which is the base model exactly as it was.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import InputError
from .variants import Variant

log = logging.getLogger(__name__)
LOADED_ENV = "FASTSD_LORAS_LOADED"


def load_adapter(pipeline, path: Path, adapter: str) -> str | None:
    """Load a LoRA file as the named adapter. None when it loaded, else why it does not fit
    (the pipeline then holds no part of it)."""
    try:
        renamed = _for_flattened_text_encoders(pipeline, path)
        if renamed is not None:
            pipeline.load_lora_weights(renamed, adapter_name=adapter)
        else:
            pipeline.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except (RuntimeError, ValueError, KeyError) as error:
        _forget(pipeline, adapter)
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    if adapter not in pipeline.get_list_adapters().get("unet", []):
        _forget(pipeline, adapter)
        return "none of its layers fits that UNet"
    return None


def _for_flattened_text_encoders(pipeline, path: Path) -> dict | None:
    """The file's tensors with text-encoder keys renamed for transformers 5, or None when it needs none.

    transformers 5 dropped CLIPTextModel's `text_model.` level; diffusers 0.42 still converts the
    published keys (kohya's lora_te1_text_model_encoder_..., diffusers' text_encoder.text_model....)
    to names under it, so text-encoder layers match nothing and loading fails with an IndexError
    (huggingface/diffusers#13984). Renamed here until diffusers handles it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    encoders = [getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")]
    if all(encoder is None or hasattr(encoder, "text_model") for encoder in encoders):
        return None
    with safe_open(path, framework="pt") as file:
        if not any("text_model" in key for key in file.keys()):
            return None
    tensors = load_file(path)
    return {
        re.sub(r"(lora_te\d?)_text_model_", r"\1_", key).replace(".text_model.", "."): t for key, t in tensors.items()
    }


def _forget(pipeline, adapter: str) -> None:
    """Remove whatever part of an adapter was loaded before loading failed."""
    if any(adapter in names for names in pipeline.get_list_adapters().values()):
        pipeline.delete_adapters(adapter)


class Adapters:
    """The users' LoRAs loaded in one pipeline's modules (shared by all its task pipelines).

    Up to FASTSD_LORAS_LOADED (default 4) stay loaded, the least recently used deleted past that.
    Only the batch worker calls apply(), so nothing here is shared between threads.
    """

    def __init__(self, pipeline, variant: Variant):
        self._pipeline = pipeline
        self._variant = variant
        self._loaded: OrderedDict[str, object] = OrderedDict()  # adapter name -> LoraFile
        self._capacity = max(1, int(os.environ.get(LOADED_ENV, "4")))
        self._active: tuple = ()

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def apply(self, loras: tuple) -> None:
        """Make exactly these (LoraFile, scale) pairs active for the next pipeline call."""
        wanted = tuple((lora.adapter, scale) for lora, scale in loras)
        if wanted == self._active:
            return
        for lora, _ in loras:
            self._load(lora, keep={name for name, _ in wanted})
        if not loras:
            if self._loaded:
                self._pipeline.disable_lora()
        else:
            self._pipeline.enable_lora()
            self._pipeline.set_adapters([name for name, _ in wanted], adapter_weights=[s for _, s in wanted])
        self._active = wanted

    def _load(self, lora, keep: set[str]) -> None:
        if lora.adapter in self._loaded:
            self._loaded.move_to_end(lora.adapter)
            return
        while len(self._loaded) >= self._capacity:
            oldest = next((name for name in self._loaded if name not in keep), None)
            if oldest is None:
                break
            del self._loaded[oldest]
            self._pipeline.delete_adapters(oldest)
            self._active = ()  # what was active may be gone: set it again
        if lora.embeddings is not None:
            self._add_tokens(lora)
        problem = load_adapter(self._pipeline, lora.path, lora.adapter)
        if problem is not None:
            self._active = ()
            raise InputError(f"{lora.name} {lora.reference} does not fit {self._variant.model}: {problem.rstrip('.')}.")
        self._loaded[lora.adapter] = lora
        log.info("loaded LoRA %s as %s (%d loaded)", lora.reference, lora.adapter, len(self._loaded))

    def _add_tokens(self, lora) -> None:
        """A Replicate training's new tokens, named for this LoRA (<user_..._s0>, see fastsd.loras):
        added to the tokenizers with their trained embeddings. No other prompt can contain them,
        so they stay when the LoRA is unloaded and change nothing for anyone else."""
        from safetensors.torch import load_file

        tokens = sorted(
            {t for value in lora.placeholders.values() for t in re.findall(r"<user_\w+?_s\d+>", value)},
            key=lambda token: int(token.rsplit("_s", 1)[1][:-1]),
        )
        indices = [int(token.rsplit("_s", 1)[1][:-1]) for token in tokens]
        embeddings = load_file(lora.embeddings)
        pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        for index, (tokenizer_name, encoder_name) in enumerate(pairs):
            tokenizer = getattr(self._pipeline, tokenizer_name, None)
            encoder = getattr(self._pipeline, encoder_name, None)
            vectors = embeddings.get(f"text_encoders_{index}")
            if tokenizer is None or encoder is None or vectors is None:
                continue
            width = encoder.get_input_embeddings().weight.shape[-1]
            if vectors.ndim != 2 or vectors.shape[-1] != width or max(indices, default=-1) >= len(vectors):
                raise InputError(
                    f"{lora.name} {lora.reference}: its token embeddings do not fit {self._variant.model}."
                )
            if tokenizer.add_tokens(tokens):
                encoder.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                weight = encoder.get_input_embeddings().weight
                weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors[indices].to(weight.dtype)
