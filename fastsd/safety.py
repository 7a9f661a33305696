"""Safety checking of generated images: two opinions, so that ordinary images are not withheld.

An image is withheld only when both of these call it NSFW:
- the classic Stable Diffusion safety checker (CLIP ViT-L/14 against 17 concept embeddings,
  diffusers' StableDiffusionSafetyChecker): what every hosted Stable Diffusion model runs, and
  whose false positives are its users' most common complaint;
- Falconsai/nsfw_image_detection, a ViT-base fine-tuned to tell normal from NSFW images
  (transformers).
The verdict is the classic checker's flag confirmed by the classifier. They run in the order that
costs least, since the verdict does not depend on it: the classifier (a sixth of the checker's
work) looks at every image, the classic checker only at those it calls NSFW. Both run batched
over one pipeline call's images, on the pipeline's device, after decoding. Their image processors
are transformers' torchvision ones: they take PIL images (the default path) or, with
FASTSD_GRAPHS=on, the call's uint8 tensors where they are, and resize, crop and normalise there.

FASTSD_SAFETY_CHECKER=off (a private deployment) loads neither: setup logs that, and every
request is logged as served unchecked.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigurationError
from .variants import NSFW_CLASSIFIER_REPO, SAFETY_CHECKER_REPO, SAFETY_ENV, Variant
from .weights.layout import NSFW_CLASSIFIER, SAFETY_CHECKER, Source

log = logging.getLogger(__name__)
NSFW_LABEL = "nsfw"
# diffusers' checker warns that it returns black images; fastsd returns none and says so itself.
logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)


class SafetyChecker:
    def __init__(self, extractor, checker, processor, classifier, device: str, dtype: torch.dtype):
        self._extractor, self._checker = extractor, checker
        self._processor, self._classifier = processor, classifier
        self._device, self._dtype = device, dtype
        labels = {str(name).lower(): int(index) for index, name in classifier.config.id2label.items()}
        if NSFW_LABEL not in labels:
            raise ConfigurationError(
                f"{NSFW_CLASSIFIER_REPO} has no {NSFW_LABEL!r} label (it has {', '.join(labels)}): "
                "it is not the NSFW classifier."
            )
        self._nsfw_index = labels[NSFW_LABEL]

    @classmethod
    def load(cls, variant: Variant, root: Path, device: str, dtype: torch.dtype) -> SafetyChecker | None:
        """The two checkers from their folders under the weights root; None when switched off."""
        if not variant.safety_checker:
            log.warning("safety checking is off (%s=off): every image is returned unchecked", SAFETY_ENV)
            return None
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPImageProcessor

        started = time.perf_counter()
        checker_folder = Source(SAFETY_CHECKER, SAFETY_CHECKER_REPO).folder(root)
        classifier_folder = Source(NSFW_CLASSIFIER, NSFW_CLASSIFIER_REPO).folder(root)
        weights = "fp16" if (checker_folder / "safety_checker" / "model.fp16.safetensors").is_file() else None
        checker: Any = StableDiffusionSafetyChecker.from_pretrained(
            checker_folder / "safety_checker", variant=weights, use_safetensors=True, dtype=dtype, local_files_only=True
        )
        extractor = CLIPImageProcessor.from_pretrained(checker_folder / "feature_extractor")
        classifier: Any = AutoModelForImageClassification.from_pretrained(
            classifier_folder, use_safetensors=True, dtype=dtype, local_files_only=True
        )
        processor = AutoImageProcessor.from_pretrained(classifier_folder)
        loaded = cls(extractor, checker.to(device).eval(), processor, classifier.to(device).eval(), device, dtype)
        log.info("safety checking on: %s, then %s, in %.1f s", SAFETY_CHECKER_REPO, NSFW_CLASSIFIER_REPO,
                 time.perf_counter() - started)  # fmt: skip
        return loaded

    def modules(self) -> dict[str, torch.nn.Module]:
        """The two models' networks, by name (fastsd.gpu captures them as graphs)."""
        return {"nsfw_classifier": self._classifier, "safety_checker": self._checker.vision_model}

    def withheld(self, images: list[Image.Image] | list[torch.Tensor]) -> list[bool]:
        """For each image, whether both the classic checker and the NSFW classifier call it NSFW.
        images: PIL images, or uint8 3 x H x W tensors (preprocessed on their device)."""
        if not images:
            return []
        verdict = [False] * len(images)
        # On tensors the processors work where the tensors are (for PIL images: on the host, as ever).
        where = {"device": images[0].device} if isinstance(images[0], torch.Tensor) else {}
        with torch.inference_mode():
            pixels = self._processor(images, return_tensors="pt", **where).pixel_values.to(self._device, self._dtype)
            called_nsfw = (self._classifier(pixel_values=pixels).logits.argmax(dim=-1) == self._nsfw_index).tolist()
            candidates = [index for index, nsfw in enumerate(called_nsfw) if nsfw]
            if candidates:
                chosen = [images[i] for i in candidates]
                clip_input = self._extractor(chosen, return_tensors="pt", **where).pixel_values
                clip_input = clip_input.to(self._device, self._dtype)
                # The checker blacks out what it flags in the images it is given: it gets
                # placeholders, and fastsd decides what to do with the flags.
                _, flagged = self._checker(images=np.zeros((len(chosen), 1, 1, 3)), clip_input=clip_input)
                for index, flag in zip(candidates, flagged, strict=True):
                    verdict[index] = bool(flag)
        log.info(
            "safety: %d of %d image(s) called NSFW by the classifier, %d of them flagged by the safety checker too",
            len(candidates),
            len(images),
            sum(verdict),
        )
        return verdict
