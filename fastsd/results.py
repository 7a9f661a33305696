"""What a request gets back from the engine, and how a call's images are shared out per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import TypeVar

import torch
from PIL import Image

T = TypeVar("T")


@dataclass
class Result:
    images: list[Image.Image]
    seed: int
    inference_time: float  # seconds in the diffusers call: prompt encoding, steps, decoding
    batch_size: int = 1  # images in the pipeline call this request ran in (its own and others')
    withheld: int = 0  # images the safety checker left out (images holds the others)
    timings: dict[str, float] = field(default_factory=dict)  # encode_time, queue_time, safety_time
    on_device: torch.Tensor | None = None  # with graphs on CUDA: the kept images as uint8, for nvJPEG


class Interrupted(Exception):
    """Every request of a running call was canceled: the call stops at the end of a step."""


def split_by_request(items: Sequence[T], counts: list[int]) -> list[Sequence[T]]:
    """A call's images (a list, or a tensor's batch) as each request's own, in order."""
    return [items[start:end] for start, end in pairwise([0, *accumulate(counts)])]
