"""Users' LoRAs as adapters next to the preset's fused acceleration, switched per pipeline call.

The acceleration (LCM-LoRA, Hyper-SD, ...) is fused into the weights at setup and costs nothing per
step. A request's own LoRAs (fastsd.loras.references resolves and checks the files) are loaded as peft
adapters through diffusers, which reads the key formats people publish (kohya, diffusers, peft),
text-encoder layers included. The most recent few stay loaded; a call without LoRAs runs with
every adapter disabled, which is the base model exactly as it was. On a compiled denoiser its
parts go into fixed slots instead (fastsd.loras.hotswap), so that switching never recompiles.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import InputError
from ..variants import Variant
from .hotswap import LoraSlots

log = logging.getLogger(__name__)
UNSETTLED = None  # Adapters._active while the modules may hold part of a change


def denoiser_label(denoiser: str) -> str:
    """The denoiser component as sentences name it: UNet, or transformer."""
    return "UNet" if denoiser == "unet" else denoiser


def load_adapter(pipeline, path: Path, adapter: str, denoiser: str = "unet") -> str | None:
    """Load a LoRA file as the named adapter (denoiser: the pipeline's component that must take some
    of it, unet or transformer). None when it loaded, else why it does not fit (the pipeline then
    holds no part of it)."""
    try:
        pipeline.load_lora_weights(_readable(pipeline, path), adapter_name=adapter)
    except (RuntimeError, ValueError, KeyError, AssertionError) as error:  # diffusers' key conversions assert
        _forget(pipeline, adapter)
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    if adapter not in pipeline.get_list_adapters().get(denoiser, []):
        _forget(pipeline, adapter)
        return f"none of its layers fits that {denoiser_label(denoiser)}"
    return None


def load_split(pipeline, path: Path, adapter: str, denoiser: str = "unet") -> tuple[tuple | None, list[str]]:
    """For a compiled denoiser: the LoRA's denoiser part, peft-keyed with its alphas (for
    LoraSlots), and its text-encoder parts loaded as the named adapter. Returns (denoiser part,
    the text encoders holding it). Raises ValueError when none of it fits."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    tensors, alphas = _state_dict(pipeline, _readable(pipeline, path))
    part = {key: value for key, value in tensors.items() if key.startswith(f"{denoiser}.") and "lora" in key}
    encoders: list[str] = []
    for name in _text_encoders(pipeline):
        if not any(key.startswith(f"{name}.") for key in tensors):
            continue
        try:
            pipeline.load_lora_into_text_encoder(
                tensors, network_alphas=alphas, text_encoder=getattr(pipeline, name), prefix=name, adapter_name=adapter
            )
        except (RuntimeError, ValueError, KeyError, IndexError):
            for loaded in (*encoders, name):
                delete_from_text_encoder(getattr(pipeline, loaded), adapter)
            raise
        encoders.append(name)
    if not part:
        for loaded in encoders:
            delete_from_text_encoder(getattr(pipeline, loaded), adapter)
        raise ValueError(f"none of its layers fits that {denoiser_label(denoiser)}")
    part_alphas = {key: value for key, value in (alphas or {}).items() if key.startswith(f"{denoiser}.")} or None
    return (convert_unet_state_dict_to_peft(part), part_alphas), encoders


def _state_dict(pipeline, readable) -> tuple[dict, dict | None]:
    """The LoRA's tensors in diffusers' names (kohya's and the trainers' converted) and its alphas,
    however the pipeline's loader returns them (FLUX.1's on request, FLUX.2's and Z-Image's never)."""
    if "return_alphas" in inspect.signature(pipeline.lora_state_dict).parameters:
        return pipeline.lora_state_dict(readable, return_alphas=True)
    loaded = pipeline.lora_state_dict(readable)
    return loaded if isinstance(loaded, tuple) else (loaded, None)


def _text_encoders(pipeline) -> list[str]:
    """The text encoders the pipeline's LoRA loader can put a LoRA in (FLUX.1's CLIP and SD's; not
    the LLM encoders of FLUX.2 and Z-Image)."""
    loadable = getattr(pipeline, "_lora_loadable_modules", ())
    return [name for name in ("text_encoder", "text_encoder_2") if name in loadable and getattr(pipeline, name, None)]


def delete_from_text_encoder(encoder, adapter: str) -> None:
    """Remove an adapter's layers from a text encoder, however much of it loaded, or none (diffusers'
    way: transformers' own delete_adapter asks for a newer peft than the pinned one)."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    delete_adapter_layers(encoder, adapter)


def _readable(pipeline, path: Path):
    """What load_lora_weights and lora_state_dict read: the file, or its renamed tensors."""
    renamed = _for_flattened_text_encoders(pipeline, path)
    return renamed if renamed is not None else str(path)


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

    A request's LoRAs are loaded, then applied; a request that fails on the way (a file that does
    not fit, a rank past the slots, a cancel) leaves the adapters it loaded deleted and those loaded
    before kept, and marks the modules' state unsettled, so that the next request sets every
    adapter, slot and text encoder from scratch: it gets exactly what it would have got without
    the failed one.
    """

    def __init__(
        self, pipeline, variant: Variant, slots: LoraSlots | None = None, capacity: int = 4, denoiser: str = "unet"
    ):
        self._pipeline = pipeline
        self._variant = variant
        self._denoiser = denoiser  # the component a LoRA must fit: unet, or the transformers' transformer
        self._slots = slots  # a compiled denoiser's: its LoRA parts go there, not into adapters
        self._parts: dict[str, tuple | None] = {}  # with slots: adapter -> its denoiser part
        self._encoders: dict[str, list[str]] = {}  # with slots: adapter -> text encoders holding it
        self._loaded: OrderedDict[str, object] = OrderedDict()  # adapter name -> LoraFile
        self._capacity = max(1, capacity)  # FASTSD_LORAS_LOADED
        # The (adapter, scale) pairs the modules apply now; UNSETTLED while a change is under way or
        # after one failed.
        self._active: tuple | None = ()

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def apply(self, loras: tuple) -> None:
        """Make exactly these (LoraFile, scale) pairs active for the next pipeline call."""
        wanted = tuple((lora.adapter, scale) for lora, scale in loras)
        if wanted == self._active:
            return
        self._active = UNSETTLED  # until the last step below is done
        added = []
        try:
            for lora, _ in loras:
                if self._load(lora):
                    added.append(lora.adapter)
            self._activate(loras)
        except BaseException:
            for adapter in added:  # leave loaded what was loaded before this request, nothing more
                del self._loaded[adapter]
                self._delete(adapter)
            raise
        self._make_room(keep={name for name, _ in wanted})
        self._active = wanted

    def _activate(self, loras: tuple) -> None:
        if self._slots is not None:
            self._apply_to_slots(loras)
        elif loras:
            self._pipeline.enable_lora()
            self._pipeline.set_adapters([lora.adapter for lora, _ in loras], adapter_weights=[s for _, s in loras])
        elif any(self._pipeline.get_list_adapters().values()):
            self._pipeline.disable_lora()

    def _load(self, lora) -> bool:
        """Load one LoRA unless it is loaded: True when it was loaded now. Raises InputError when it
        does not fit, leaving nothing of it in the modules."""
        if lora.adapter in self._loaded:
            self._loaded.move_to_end(lora.adapter)
            return False
        try:
            if lora.embeddings is not None:
                self._add_tokens(lora)
            problem = self._load_adapter(lora)
        except BaseException:
            self._delete(lora.adapter)
            raise
        if problem is not None:
            self._delete(lora.adapter)
            raise InputError(
                f"{lora.name} {lora.reference} does not fit {self._variant.model}: {problem.rstrip('.')}.",
                field=lora.name,
            )
        self._loaded[lora.adapter] = lora
        log.info("loaded LoRA %s as %s (%d loaded)", lora.reference, lora.adapter, len(self._loaded))
        return True

    def _make_room(self, keep: set[str]) -> None:
        """Delete the least recently used past FASTSD_LORAS_LOADED, never one of this request's
        (after its LoRAs are loaded and applied: a request that fails deletes none)."""
        while len(self._loaded) > self._capacity:
            oldest = next((name for name in self._loaded if name not in keep), None)
            if oldest is None:
                return
            del self._loaded[oldest]
            self._delete(oldest)

    def _load_adapter(self, lora) -> str | None:
        if self._slots is None:
            return load_adapter(self._pipeline, lora.path, lora.adapter, self._denoiser)
        try:
            part, encoders = load_split(self._pipeline, lora.path, lora.adapter, self._denoiser)
        except (RuntimeError, ValueError, KeyError, IndexError) as error:
            return str(error).splitlines()[0] if str(error) else type(error).__name__
        self._parts[lora.adapter], self._encoders[lora.adapter] = part, encoders
        return self._slots.refusal(part)

    def _delete(self, adapter: str) -> None:
        """Remove every part of an adapter from the modules, however much of it loaded."""
        if self._slots is None:
            _forget(self._pipeline, adapter)
            return
        self._parts.pop(adapter, None)
        self._encoders.pop(adapter, None)
        for name in _text_encoders(self._pipeline):
            delete_from_text_encoder(getattr(self._pipeline, name), adapter)

    def _apply_to_slots(self, loras: tuple) -> None:
        """Denoiser parts into the slots (lora_weights, extra_lora; the rest emptied), text-encoder
        parts as adapters, set on each text encoder that holds any."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        slots = self._slots
        assert slots is not None  # only a compiled denoiser's adapters go into slots
        for index in range(len(slots.holding)):
            lora, scale = loras[index] if index < len(loras) else (None, 0.0)
            adapter = lora.adapter if lora else None
            try:
                slots.hold(index, adapter, self._parts.get(adapter) if adapter else None, scale)
            except ValueError as error:
                if lora is None:  # emptying a slot failed: the deployment's fault, not the request's
                    raise RuntimeError(f"LoRA slot {index} could not be emptied: {error}") from None
                raise InputError(
                    f"{lora.name} {lora.reference} does not fit this compiled deployment's LoRA slot: {error}.",
                    field=lora.name,
                ) from None
        for name in _text_encoders(self._pipeline):
            encoder = getattr(self._pipeline, name)
            chosen = [(lora.adapter, scale) for lora, scale in loras if name in self._encoders.get(lora.adapter, [])]
            if chosen:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([a for a, _ in chosen], encoder, [s for _, s in chosen])
            elif any(name in names for names in self._encoders.values()):
                disable_lora_for_text_encoder(encoder)

    def _add_tokens(self, lora) -> None:
        """A Replicate training's new tokens, named for this LoRA (<user_..._s0>, see fastsd.loras.references):
        added to the tokenizers with their trained embeddings. No other prompt can contain them,
        so they stay when the LoRA is unloaded (or fails to load) and change nothing for anyone else."""
        from safetensors.torch import load_file

        tokens = sorted(
            {t for value in lora.placeholders.values() for t in re.findall(r"<user_\w+?_s\d+>", value)},
            key=lambda token: int(token.rsplit("_s", 1)[1][:-1]),
        )
        indices = [int(token.rsplit("_s", 1)[1][:-1]) for token in tokens]
        embeddings = load_file(lora.embeddings)
        pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        targets = []  # every pair checked before any is changed: a misfit adds no token anywhere
        for index, (tokenizer_name, encoder_name) in enumerate(pairs):
            tokenizer = getattr(self._pipeline, tokenizer_name, None)
            encoder = getattr(self._pipeline, encoder_name, None)
            vectors = embeddings.get(f"text_encoders_{index}")
            if tokenizer is None or encoder is None or vectors is None:
                continue
            width = encoder.get_input_embeddings().weight.shape[-1]
            if vectors.ndim != 2 or vectors.shape[-1] != width or max(indices, default=-1) >= len(vectors):
                raise InputError(
                    f"{lora.name} {lora.reference}: its token embeddings do not fit {self._variant.model}.",
                    field=lora.name,
                )
            targets.append((tokenizer, encoder, vectors))
        for tokenizer, encoder, vectors in targets:
            if tokenizer.add_tokens(tokens):
                encoder.resize_token_embeddings(len(tokenizer))
            with torch.no_grad():
                weight = encoder.get_input_embeddings().weight
                weight[tokenizer.convert_tokens_to_ids(tokens)] = vectors[indices].to(weight.dtype)
