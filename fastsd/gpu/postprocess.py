"""Images kept on the device until they are encoded.

The pipeline returns its images as a tensor on the device (output_type "pt"); they become uint8
there, with diffusers' own rounding (x 255, round half to even), so the pixels are exactly those
of its PIL output. Inpainting's composite is made there too (keep_unmasked), the safety models
preprocess the device tensors (fastsd.safety), and the images cross to the host in one copy for
the whole call. JPEG outputs are encoded from the device's uint8 tensors
(torchvision.io.encode_jpeg: nvJPEG on CUDA tensors); WebP and PNG from the host array, on the
engine's encoder threads.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .. import images as host_images

log = logging.getLogger(__name__)
_jpeg_lock = threading.Lock()  # nvJPEG from one thread at a time


@functools.cache
def gpu_jpeg() -> bool:
    """Whether nvJPEG works here (a torchvision built for this torch and CUDA); else Pillow encodes."""
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io

        torchvision.io.encode_jpeg([torch.zeros(3, 8, 8, dtype=torch.uint8, device="cuda")])
    except Exception as error:  # noqa: BLE001 - any failure means the CPU encoder, never a failed request
        log.warning("jpg outputs are encoded on the CPU: nvJPEG through torchvision is unavailable (%s)", error)
        return False
    return True


@dataclass
class Frames:
    images: list[Image.Image]  # on the host, for WebP and PNG (and Result.images)
    on_device: torch.Tensor | None  # uint8 N x 3 x H x W where the GPU encodes JPEG; None on a CPU


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> uint8 on the same device, rounded as diffusers' PIL output is."""
    return (images.float() * 255).round().to(torch.uint8)


def to_frames(as_bytes: torch.Tensor) -> Frames:
    """uint8 N x 3 x H x W on the device -> the call's one copy to the host."""
    host = as_bytes.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return Frames([Image.fromarray(array) for array in host], as_bytes if as_bytes.is_cuda and gpu_jpeg() else None)


def keep_unmasked(original: Image.Image, generated: torch.Tensor, mask: Image.Image) -> torch.Tensor:
    """images.keep_unmasked on the device: generated (uint8 N x 3 x H x W) laid onto the original
    (RGB: fastsd.inputs flattens any transparency) through the same soft-edged mask, blended with
    Pillow's arithmetic (round(x / 255), as its Paste.c does), so the kept pixels are the original's
    exactly. The soft edge is made from the mask (an input, not a generated image) by
    images.soft_edge on the host: exactly Pillow's blur."""
    device = generated.device  # uploaded as uint8, widened there: a quarter of the bytes to copy
    soft = torch.from_numpy(np.array(host_images.soft_edge(mask))).to(device).to(torch.int32)
    kept = torch.from_numpy(np.array(original)).to(device).to(torch.int32).permute(2, 0, 1)
    blended = generated.to(torch.int32) * soft + kept * (255 - soft) + 128
    return ((blended + (blended >> 8)) >> 8).to(torch.uint8)


def encode_jpeg(frames: torch.Tensor, quality: int) -> list[bytes]:
    """uint8 N x 3 x H x W (any device) -> JPEG files; on CUDA tensors nvJPEG does the work."""
    import torchvision.io

    with _jpeg_lock:
        if frames.is_cuda:
            torch.cuda.current_stream().synchronize()  # the frames are complete before nvJPEG reads them
        encoded = torchvision.io.encode_jpeg(list(frames), quality=quality)
    return [bytes(data.cpu().numpy()) for data in encoded]
