"""Where weights live on disk, and the check that they are there before anything loads them.

Folders mirror hub ids: weights/<hub id>/ for models and VAEs, lora/<hub id>/ for LoRAs, both
under the project root (FASTSD_WEIGHTS_ROOT overrides it). A local folder may also be named
directly as a custom model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigurationError
from .variants import Variant

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name the LCM-LoRA repos publish


def weights_root() -> Path:
    return Path(os.environ.get("FASTSD_WEIGHTS_ROOT", PROJECT_ROOT))


def model_folder(model: str) -> Path:
    """The folder of a model named by hub id (under weights/) or by a local path."""
    local = Path(model).expanduser()
    if local.is_absolute() or model.startswith("."):
        return local
    return weights_root() / "weights" / model


def lora_folder(hub_id: str) -> Path:
    return weights_root() / "lora" / hub_id


class WeightsMissing(ConfigurationError):
    pass


def fetch_command(variant: Variant) -> str:
    if variant.name.startswith("custom:"):
        return f"python scripts/download_weights.py --model {variant.model} --acceleration {variant.acceleration}"
    return f"python scripts/download_weights.py {variant.name}"


def require_weights(variant: Variant) -> None:
    """Fail with one message that names every missing folder and the command that fetches them."""
    needed = [model_folder(variant.model) / "model_index.json"]
    if variant.vae:
        needed.append(model_folder(variant.vae) / "config.json")
    if variant.lora:
        needed.append(lora_folder(variant.lora) / LORA_WEIGHT_NAME)
    missing = [path for path in needed if not path.is_file()]
    if missing:
        listed = ", ".join(str(path) for path in missing)
        raise WeightsMissing(
            f"Weights for variant {variant.name} are missing: {listed}. Fetch them with: {fetch_command(variant)}"
        )


def ensure_weights(variant: Variant, weights_url: str | None = None) -> None:
    """Make sure the variant's weights are on disk before loading: the one entry point setup() uses."""
    require_weights(variant)
