"""Where weights live on disk, and the check that they are there before anything loads them.

Folders mirror hub ids: weights/<hub id>/ for models and VAEs, lora/<hub id>/ for LoRAs, both
under the project root (FASTSD_WEIGHTS_ROOT overrides it). A local folder may also be named
directly as a custom model.

A folder fetched by scripts/download_weights.py or unpacked from a weights tar carries a
manifest (.fastsd-manifest.json, see fastsd.manifest): at boot every file it lists is checked
by size, so a truncated or missing file stops setup with its name and the command that fetches
it again. A folder without a manifest (put there by hand, by fastsd_testing.random_models, or by the
acceptance tests) is loaded as it is: the check logs that its files were not verified.

setup() calls ensure_weights(): when a folder is missing it is fetched first, from the weights
tar at Cog's setup(weights) URL or FASTSD_WEIGHTS_URL (fastsd.fetch), else from the hub
(fastsd.download) if the hub answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import manifest
from .errors import ConfigurationError
from .variants import Variant

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name the LCM-LoRA repos publish
WEIGHTS_URL_ENV = "FASTSD_WEIGHTS_URL"
# The file whose presence says a folder of that role is there at all.
_MARKER = {"model": "model_index.json", "vae": "config.json", "tiny_vae": "config.json", "lora": LORA_WEIGHT_NAME}


def weights_root() -> Path:
    return Path(os.environ.get("FASTSD_WEIGHTS_ROOT", PROJECT_ROOT))


def is_local_path(model: str) -> bool:
    return Path(model).expanduser().is_absolute() or model.startswith(".")


def model_folder(model: str) -> Path:
    """The folder of a model named by hub id (under weights/) or by a local path."""
    if is_local_path(model):
        return Path(model).expanduser()
    return weights_root() / "weights" / model


def lora_folder(hub_id: str) -> Path:
    return weights_root() / "lora" / hub_id


def variant_repos(variant: Variant, tiny_vae: bool = True) -> list[tuple[str, str]]:
    """(role, hub id) of every repo the variant uses: model, vae, lora (required), then its tiny
    autoencoder (optional: loaded when present; fetched, packed and baked unless tiny_vae=False)."""
    repos = [(role, hub_id) for role, hub_id in variant.hub_ids.items() if role in _MARKER]
    if tiny_vae:
        repos.append(("tiny_vae", variant.tiny_vae))
    return repos


def required_repos(variant: Variant) -> list[tuple[str, str]]:
    """The repos without which the variant cannot load (its tiny autoencoder is optional)."""
    return [(role, hub_id) for role, hub_id in variant_repos(variant) if role != "tiny_vae"]


def role_folder(role: str, hub_id: str) -> Path:
    return lora_folder(hub_id) if role == "lora" else model_folder(hub_id)


def variant_folders(variant: Variant, tiny_vae: bool = True) -> list[Path]:
    """The folders of the variant's repos that live under the weights root (not local paths)."""
    return [
        role_folder(role, hub_id)
        for role, hub_id in variant_repos(variant, tiny_vae)
        if not (role == "model" and is_local_path(hub_id))
    ]


class WeightsMissing(ConfigurationError):
    pass


def fetch_command(variant: Variant) -> str:
    if variant.name.startswith("custom:"):
        return f"python scripts/download_weights.py --model {variant.model} --acceleration {variant.acceleration}"
    return f"python scripts/download_weights.py {variant.name}"


def _missing(variant: Variant) -> list[Path]:
    """The marker file of every folder that is not there at all."""
    needed = [role_folder(role, hub_id) / _MARKER[role] for role, hub_id in required_repos(variant)]
    return [path for path in needed if not path.is_file()]


_logged_unverified: set[Path] = set()


def _damaged(variant: Variant) -> list[manifest.Problem]:
    """Files that a folder's manifest lists but that are missing or of the wrong size (the
    optional tiny autoencoder's too, when its folder is there)."""
    problems = []
    for role, hub_id in variant_repos(variant):
        folder = role_folder(role, hub_id)
        if role == "tiny_vae" and not folder.is_dir():
            continue
        try:
            listed = manifest.load(folder)
        except ValueError as error:
            problems.append(manifest.Problem(manifest.manifest_path(folder), str(error)))
            continue
        if listed is None:
            if folder not in _logged_unverified:
                _logged_unverified.add(folder)
                log.info("%s has no %s: checking its safetensors headers only", folder, manifest.MANIFEST_NAME)
            problems += manifest.check_without_manifest(folder)
            continue
        problems += manifest.check(folder, listed)
    return problems


def require_weights(variant: Variant) -> None:
    """Fail with one message that names every missing or damaged file and the command that fetches them."""
    missing = _missing(variant)
    if missing:
        listed = ", ".join(str(path) for path in missing)
        raise WeightsMissing(
            f"Weights for variant {variant.name} are missing: {listed}. Fetch them with: {fetch_command(variant)}"
        )
    damaged = _damaged(variant)
    if damaged:
        listed = ", ".join(str(problem) for problem in damaged)
        raise WeightsMissing(
            f"Weights for variant {variant.name} are damaged: {listed}. Fetch them again with: {fetch_command(variant)}"
        )


def ensure_weights(variant: Variant, weights_url: str | None = None) -> None:
    """Make sure the variant's weights are on disk before loading: the one entry point setup() uses.

    Folders already there are only checked (sizes against their manifest). Missing ones are
    fetched: from the weights tar at weights_url (Cog's setup(weights)) or FASTSD_WEIGHTS_URL,
    else from the hub when it answers; when neither works the error names the missing files and
    the ways to provide them.
    """
    missing = _missing(variant)
    if missing:
        url = weights_url or os.environ.get(WEIGHTS_URL_ENV, "").strip() or None
        if url:
            from . import fetch

            optional = [
                folder
                for folder in _relative_folders(variant_folders(variant))
                if not (weights_root() / folder).is_dir()
            ]
            fetch.fetch_archive(url, weights_root(), _relative(missing), optional=optional, log=log.info)
        else:
            _fetch_from_hub(variant, missing)
    require_weights(variant)


def _relative_folders(folders: list[Path]) -> list[Path]:
    root = weights_root()
    return [folder.relative_to(root) for folder in folders if folder.is_relative_to(root)]


def _relative(markers: list[Path]) -> list[Path]:
    root = weights_root()
    folders = []
    for marker in markers:
        try:
            folders.append(marker.parent.relative_to(root))
        except ValueError:
            raise WeightsMissing(
                f"{marker} is missing and is not under the weights root {root}: a local model folder cannot be fetched."
            ) from None
    return folders


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fetch_from_hub(variant: Variant, missing: list[Path]) -> None:
    listed = ", ".join(str(path) for path in missing)
    unfetchable = (
        f"Weights for variant {variant.name} are missing: {listed}. Fetch them with: "
        f"{fetch_command(variant)}, or set {WEIGHTS_URL_ENV} to a weights tar "
        "(python scripts/pack_weights.py makes one)"
    )
    if _hub_offline():
        raise WeightsMissing(unfetchable + "; HF_HUB_OFFLINE is set, so the hub was not asked.")
    if any(
        is_local_path(hub_id) and role == "model"
        for role, hub_id in required_repos(variant)
        if role_folder(role, hub_id) / _MARKER[role] in missing
    ):
        raise WeightsMissing(unfetchable + ".")
    from . import download

    log.info("weights missing (%s): fetching them from the hub (%s)", listed, download.endpoint())
    try:
        download.fetch_variant(variant, progress=False, report=log.info)
    except download.WeightsDownloadError as error:
        raise WeightsMissing(f"{unfetchable}; fetching from the hub failed: {error}") from None


def ensure_model_folder(model: str, weights_url: str | None = None) -> None:
    """For a custom model (FASTSD_MODEL) named by hub id: fetch its folder before anything reads
    its configs (custom_variant detects SD or SDXL from them), from the weights tar at
    weights_url or FASTSD_WEIGHTS_URL (with the LCM-LoRAs and tiny autoencoders it holds), else
    from the hub. A local folder, or one already there, is left alone."""
    folder = model_folder(model)
    if is_local_path(model) or (folder / "model_index.json").is_file():
        return
    root = weights_root()
    url = weights_url or os.environ.get(WEIGHTS_URL_ENV, "").strip() or None
    if url:
        from . import fetch
        from .variants import LCM_LORA_FOR, VARIANTS

        extras = {Path("lora") / hub_id for hub_id in LCM_LORA_FOR.values()}
        extras |= {Path("weights") / v.tiny_vae for v in VARIANTS.values()}
        optional = [extra for extra in sorted(extras) if not (root / extra).is_dir()]
        fetch.fetch_archive(url, root, [folder.relative_to(root)], optional=optional, log=log.info)
        return
    acceleration = os.environ.get("FASTSD_ACCELERATION", "lcm-lora").strip()
    command = f"python scripts/download_weights.py --model {model} --acceleration {acceleration}"
    if _hub_offline():
        raise WeightsMissing(
            f"The weights of {model} are missing ({folder}). Fetch them with: {command}, or set "
            f"{WEIGHTS_URL_ENV} to a weights tar; HF_HUB_OFFLINE is set, so the hub was not asked."
        )
    from . import download

    log.info("weights of %s missing: fetching them from the hub (%s)", model, download.endpoint())
    try:
        download.fetch_repo(download.MODEL, model, progress=False)
    except download.WeightsDownloadError as error:
        raise WeightsMissing(
            f"The weights of {model} are missing ({folder}). Fetch them with: {command}, or set "
            f"{WEIGHTS_URL_ENV} to a weights tar; fetching from the hub failed: {error}"
        ) from None
