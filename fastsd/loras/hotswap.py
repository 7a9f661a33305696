"""Users' LoRAs on a compiled denoiser: fixed slots whose weights are swapped in place (peft hot-swap).

A compiled UNet or transformer (FASTSD_COMPILE) must keep the graph it was compiled with: loading,
deleting or switching adapters changes the graph, and compiling again takes minutes. So before
compiling, a deployment that serves LoRAs gives its denoiser one slot per LoRA input (lora_weights,
extra_lora): a zero adapter of rank FASTSD_LORA_MAX_RANK on the layers LoRAs are trained on
(SlotLayers: the UNet's usual targets; every linear layer of a transformer's repeated blocks). A
request's LoRA is copied into its slot by diffusers' hot-swap (peft pads it to the slot's rank and
zeroes the layers it does not train), with its scale folded into its up-projections; a slot a
request leaves empty gets zeros. The slots' scalings are tensors (peft's
prepare_model_for_compiled_hotswap) and the copies are in place, so the compiled graph never sees
a change. The text encoders are not compiled: there a LoRA stays an ordinary adapter
(fastsd.loras.adapters).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MAX_RANK_ENV = "FASTSD_LORA_MAX_RANK"
SLOTS = ("fastsd_slot_0", "fastsd_slot_1")  # lora_weights, extra_lora
PART_COPIED = ("part copied",)  # LoraSlots.holding of a slot while a copy into it is under way


@dataclass(frozen=True)
class SlotLayers:
    """The denoiser's layers the slots cover: peft's target_modules (a pattern over module names,
    or the names themselves), and what they are, for the sentence refusing a LoRA that trains others."""

    targets: str | frozenset[str]
    described: str

    def holds(self, layer: str) -> bool:
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, layer) is not None
        return layer in self.targets


# The UNet layers of kohya's default network (attention, feed-forward, the transformer blocks'
# projections, time-embedding projections), which hold diffusers' and peft's training scripts'
# layers. Not the ResNet and resampling 3x3 convolutions (LoCon, LyCORIS): on the CPU two rank-64
# slots there cost a fifth of an sd-turbo UNet step even when empty; without them, about 6%.
UNET_LAYERS = SlotLayers(
    r".*\.(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|time_emb_proj)",
    "attention, feed-forward and projection layers, not ResNet convolutions",
)


def block_layers(transformer) -> SlotLayers:
    """Every linear layer inside the transformer's repeated blocks (the classes diffusers names in
    _repeated_blocks): what the FLUX, FLUX.2 and Z-Image trainers (ai-toolkit, kohya, diffusers)
    train, modulation included. Outside them (embedders, the final layer) stay the base's."""
    blocks = [
        name for name, module in transformer.named_modules() if type(module).__name__ in transformer._repeated_blocks
    ]
    names = frozenset(
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.startswith(f"{block}.") for block in blocks)
    )
    return SlotLayers(names, "the linear layers of its transformer blocks")


def _fits(shape: tuple, slot: tuple | None, rank_dim: int) -> bool:
    """A LoRA tensor of this shape goes into a slot tensor of that one: the same, or a lower rank."""
    if slot is None or len(shape) != len(slot):
        return False
    return all(n == s or (d == rank_dim and n < s) for d, (n, s) in enumerate(zip(shape, slot, strict=True)))


class LoraSlots:
    """The compiled denoiser's LoRA slots, and what each holds (only the batch worker calls hold()).
    prefix: how a pipeline's LoRA state dict names the denoiser (unet, transformer)."""

    def __init__(self, denoiser, rank: int, layers: SlotLayers, prefix: str):
        from peft import LoraConfig
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        targets = layers.targets if isinstance(layers.targets, str) else sorted(layers.targets)
        for slot in SLOTS:  # lora_B starts at zero: an empty slot changes nothing
            denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), adapter_name=slot)
        denoiser.set_adapters(list(SLOTS), [1.0] * len(SLOTS))
        prepare_model_for_compiled_hotswap(denoiser, target_rank=rank)
        self._denoiser, self.rank, self.layers, self.prefix = denoiser, rank, layers, prefix
        # What each slot tensor is shaped, by the key a LoRA's denoiser part names it with.
        self._shapes = {
            key.replace(f".{SLOTS[0]}.", "."): tuple(tensor.shape)
            for key, tensor in denoiser.state_dict().items()
            if f".{SLOTS[0]}." in key
        }
        self.holding: list[tuple | None] = [None] * len(SLOTS)  # (adapter, scale), None: empty, or PART_COPIED
        self._empty = self._zeros()
        log.info("%d LoRA slots of rank %d in the %s, for hot-swapping (%s)", len(SLOTS), rank, prefix, MAX_RANK_ENV)

    def refusal(self, part: tuple | None) -> str | None:
        """Why a LoRA's denoiser part cannot go into a slot, or None (a LoRA of the text encoders
        only has no denoiser part: nothing to refuse)."""
        if part is None:
            return None
        layers = {self._layer(key) for key in part[0]}
        outside = sorted(layer for layer in layers if not self.layers.holds(layer))
        if outside:
            return (
                f"it trains layers this compiled deployment's LoRA slots do not hold ({outside[0]}: the slots hold "
                f"{self.layers.described}); it works on a deployment without FASTSD_COMPILE"
            )
        rank = max((t.shape[1] for key, t in part[0].items() if ".lora_B." in key and t.ndim > 1), default=0)
        if rank > self.rank:
            return f"its rank is {rank}, and this deployment's LoRA slots hold up to {self.rank} ({MAX_RANK_ENV})"
        # A hot-swap that fails takes the slot out of the UNet (diffusers deletes the adapter it was
        # copying into), and a new slot means compiling again: so every tensor is checked here first.
        for key, tensor in part[0].items():
            rank_dim = 0 if ".lora_A." in key else 1
            if not _fits(tuple(tensor.shape), self._shapes.get(key.removeprefix(f"{self.prefix}.")), rank_dim):
                return f"its layer {self._layer(key)} is not one of this model's (a LoRA for another base model?)"
        return None

    def _layer(self, key: str) -> str:
        return key.split(".lora_", 1)[0].removeprefix(f"{self.prefix}.")

    def _zeros(self) -> dict[str, torch.Tensor]:
        """The smallest adapter: rank 1, zero, on one layer. Swapped in, it zeroes the whole slot."""
        name, layer = next(
            (name, module)
            for name, module in self._denoiser.named_modules()
            if isinstance(getattr(module, "base_layer", None), torch.nn.Linear)
        )
        base = layer.base_layer
        return {
            f"{self.prefix}.{name}.lora_A.weight": torch.zeros(1, base.in_features),
            f"{self.prefix}.{name}.lora_B.weight": torch.zeros(base.out_features, 1),
        }

    def hold(self, index: int, adapter: str | None, part: tuple | None, scale: float) -> None:
        """Put one LoRA's denoiser part (its peft-keyed tensors and alphas) into slot index at this
        scale; adapter None empties the slot. Raises ValueError, leaving the slot empty, when it
        does not fit."""
        if adapter is None or part is None:
            if self.holding[index] is not None:
                self._swap(index, self._empty, None, None)
            return
        wanted = (adapter, scale)
        if self.holding[index] == wanted:
            return
        tensors, alphas = part
        # In fp32: a published fp16 factor times 1.5 would round, where an adapter's scaling does not.
        scaled = {key: t.float() * scale if ".lora_B." in key else t for key, t in tensors.items()}
        try:
            self._swap(index, scaled, alphas, wanted)
        except (ValueError, RuntimeError, KeyError) as error:
            self._swap(index, self._empty, None, None)
            raise ValueError(str(error).splitlines()[0] or type(error).__name__) from None

    def _swap(self, index: int, tensors: dict, alphas: dict | None, held: tuple | None) -> None:
        # Until the copy is complete the slot may hold part of it: equal to nothing hold() is asked
        # for, so the next hold() of this slot copies in full, even an empty one.
        self.holding[index] = PART_COPIED
        self._denoiser.load_lora_adapter(
            tensors, prefix=self.prefix, network_alphas=alphas, adapter_name=SLOTS[index], hotswap=True
        )
        self.holding[index] = held
