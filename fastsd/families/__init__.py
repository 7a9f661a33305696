"""What differs between model architectures, one module each; the rest of fastsd asks a Family.

    stable_diffusion   SD 1.x/2.x and SDXL: a UNet, CLIP text encoders read through compel
    flux               FLUX.1: a transformer, T5-XXL and CLIP-L
    flux2              FLUX.2 [klein]: a transformer on Qwen3's hidden states, reference images
    zimage             Z-Image: a single-stream transformer on Qwen3, FLUX.1's autoencoder

A Family says which diffusers pipeline runs each task, which module denoises (what is compiled),
how prompts are read and encoded, a call's task arguments (start image, mask, references), and
which tiny autoencoder decodes its latents. The loader (fastsd.pipelines), the engine and the
validation path ask it and never name an architecture; the presets themselves are rows in
fastsd.variants.
"""

from __future__ import annotations

from . import flux, flux2, stable_diffusion, zimage
from .base import Family, Prompts, join_embeddings, length_of

__all__ = ["FAMILIES", "Family", "Prompts", "family_of", "join_embeddings", "length_of"]

FAMILIES: tuple[Family, ...] = (stable_diffusion.FAMILY, flux.FAMILY, flux2.FAMILY, zimage.FAMILY)


def family_of(architecture: str) -> Family:
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    raise ValueError(f"no family serves the architecture {architecture!r}")
