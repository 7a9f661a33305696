"""The end of a pipeline call, per request: inpainting's composite (the kept pixels exact), the
safety check of the call's images, the images on the host. One interface, two places to do it:
on the host with PIL images (the default), or on the device with the call's tensor, copied to the
host once (FASTSD_GRAPHS=on: fastsd.gpu.postprocess)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from . import images
from .gpu import postprocess
from .inputs import GenerationRequest
from .results import split_by_request
from .safety import SafetyChecker
from .tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Finished:
    images: list[list[Image.Image]]  # per request, on the host
    withheld: list[list[bool]]  # per request, per image: left out by the safety checker
    on_device: torch.Tensor | None = None  # the call's uint8 images where the GPU encodes JPEG


def _composite(request: GenerationRequest, image: Image.Image) -> Image.Image:
    assert request.image is not None and request.mask is not None  # inpainting has both
    return images.keep_unmasked(request.image, image, request.mask)


class Finish:
    """Host: the pipeline returns PIL images, finished one by one."""

    output_type = "pil"

    def __init__(self, safety: SafetyChecker | None):
        self.safety = safety

    def __call__(self, requests: Sequence[GenerationRequest], generated, counts: list[int]) -> Finished:
        mine = split_by_request(generated, counts)
        kept = [
            [_composite(request, image) for image in own] if request.task is Task.INPAINTING else list(own)
            for request, own in zip(requests, mine, strict=True)
        ]
        return Finished(kept, self.withheld(requests, kept))

    def withheld(self, requests: Sequence[GenerationRequest], by_request: Sequence[Sequence]) -> list[list[bool]]:
        """Per request, per image: withheld by the safety checker. One batched check for the call."""
        checked = [image for request, own in zip(requests, by_request, strict=True) if request.check_safety
                   for image in own]  # fmt: skip
        if checked and self.safety is None:
            log.warning("safety checking is off on this deployment: %d image(s) returned unchecked", len(checked))
        flags = iter(self.safety.withheld(checked) if checked and self.safety else [])
        return [
            [next(flags) if request.check_safety and self.safety else False for _ in own]
            for request, own in zip(requests, by_request, strict=True)
        ]


class DeviceFinish(Finish):
    """Device: the pipeline returns a tensor there; uint8, the composite and the safety models'
    preprocessing there too, then one copy to the host."""

    output_type = "pt"

    def __call__(self, requests: Sequence[GenerationRequest], generated, counts: list[int]) -> Finished:
        with torch.inference_mode():
            as_bytes = postprocess.as_uint8(generated)
            own = list(as_bytes.split(counts))
            for index, request in enumerate(requests):
                if request.task is Task.INPAINTING:
                    assert request.image is not None and request.mask is not None  # inpainting has both
                    own[index] = postprocess.keep_unmasked(request.image, own[index], request.mask)
            withheld = self.withheld(requests, own)
            composited = torch.cat(own) if requests[0].task is Task.INPAINTING else as_bytes
            frames = postprocess.to_frames(composited)
        return Finished([list(part) for part in split_by_request(frames.images, counts)], withheld, frames.on_device)
