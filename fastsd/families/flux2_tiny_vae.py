"""FLUX.2's tiny autoencoder (fal/FLUX.2-Tiny-AutoEncoder), as the klein pipelines can use it.

fal's model decodes the transformer's normalised 128-channel patches directly. The klein pipelines
un-normalise latents with the full autoencoder's batch norm and undo its patches before decoding:
this one's batch norm is the identity and it patches again, so that the pipelines run unchanged.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import AutoencoderTiny
from diffusers.models.modeling_utils import ModelMixin


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): FLUX.2's 2x2 patches, as its pipelines make them."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(batch, channels * 4, height // 2, width // 2)


def _unpatchify(latents: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = latents.shape
    pixels = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
    return pixels.reshape(batch, channels // 4, height * 2, width * 2)


class _Encoded:
    """What diffusers' retrieve_latents reads from an encoder's output."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents


class Flux2TinyAutoencoder(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' own models do the same
    """fal/FLUX.2-Tiny-AutoEncoder: TAESD's encoder and decoder at 32 channels, a strided
    convolution to and from FLUX.2's 128-channel patches, each with a residual block. Its layers
    carry the names of fal's safetensors file and it reads fal's config.json; the repo's own
    Python is never run."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 128,
        encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64),
        act_fn: str = "silu",
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3),
        num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1),
        latent_magnitude: float = 3.0,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        inner = latent_channels // 4
        self.tiny_vae = AutoencoderTiny(
            in_channels=in_channels, out_channels=out_channels, latent_channels=inner,
            encoder_block_out_channels=tuple(encoder_block_out_channels),
            decoder_block_out_channels=tuple(decoder_block_out_channels), act_fn=act_fn,
            upsampling_scaling_factor=upsampling_scaling_factor, num_encoder_blocks=tuple(num_encoder_blocks),
            num_decoder_blocks=tuple(num_decoder_blocks), latent_magnitude=latent_magnitude,
            latent_shift=latent_shift, force_upcast=force_upcast, scaling_factor=scaling_factor,
        )  # fmt: skip
        self.extra_encoder = torch.nn.Conv2d(inner, latent_channels, kernel_size=4, stride=2, padding=1)
        self.extra_decoder = torch.nn.ConvTranspose2d(latent_channels, inner, kernel_size=4, stride=2, padding=1)
        self.residual_encoder = _residual_block(latent_channels)
        self.residual_decoder = _residual_block(inner)
        # What the klein pipelines read of FLUX.2's autoencoder: its depth (the 8x of the latents),
        # the batch norm's epsilon and statistics (identity: mean 0, variance 1 - eps).
        self.register_to_config(block_out_channels=tuple(encoder_block_out_channels), batch_norm_eps=1e-4)
        self.bn = torch.nn.Module()
        self.bn.register_buffer("running_mean", torch.zeros(latent_channels), persistent=False)
        self.bn.register_buffer("running_var", torch.full((latent_channels,), 1.0 - 1e-4), persistent=False)

    @property
    def decoder(self) -> torch.nn.Module:
        """The module a decode runs most of its time in (what torch.compile compiles)."""
        return self.tiny_vae.decoder

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        inner = self.tiny_vae.encode(images, return_dict=False)[0]
        patches = self.extra_encoder(inner)
        latents = _unpatchify(self.residual_encoder(patches) + patches)  # the pipeline patches it again
        return _Encoded(latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        inner = self.extra_decoder(_patchify(latents))
        images = self.tiny_vae.decode(self.residual_decoder(inner) + inner, return_dict=False)[0]
        return DecoderOutput(sample=images) if return_dict else (images,)


def _residual_block(channels: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        torch.nn.GroupNorm(8, channels),
        torch.nn.SiLU(),
        torch.nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )
