"""What a request asks the model to do. A new task (inpainting, ControlNet) is a new value here,
a diffusers pipeline for it in fastsd.pipelines, and its inputs in fastsd.inputs."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINTING = "inpainting"  # image-to-image within a mask (or the image's transparent pixels)


# Which loaded pipeline runs a request: its task, its VAE (full, tiny) and its ControlNet or None.
PipelineKey = tuple[Task, str, str | None]
