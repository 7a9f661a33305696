"""Making sure a preset's weights are on disk before anything loads them.

A folder fetched by scripts/download_weights.py or unpacked from a weights tar carries a
manifest (.fastsd-manifest.json, see fastsd.weights.manifest): at boot every file of it that the preset
loads is checked by size, so a truncated or missing file stops setup with its name and the
command that fetches it again. A folder without a manifest (put there by hand, by
fastsd_testing.random_models, or by the acceptance tests) gets its safetensors headers checked.

setup() calls ensure_weights(): what is missing is fetched first, from the weights tar at Cog's
setup(weights) URL or FASTSD_WEIGHTS_URL (fastsd.weights.fetch), else from the hub
(fastsd.weights.download) if the hub answers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigurationError
from ..settings import Settings
from ..variants import SDXL_VAE_FP16_FIX, TINY_VAE_FOR, Variant, all_recipes
from . import download, fetch, manifest
from .layout import MODEL, Source, fetch_command, is_local_path, model_folder, python_command, required_sources, sources

log = logging.getLogger(__name__)

WEIGHTS_URL_ENV = "FASTSD_WEIGHTS_URL"


class WeightsMissing(ConfigurationError):
    pass


def missing(variant: Variant, root: Path) -> list[Source]:
    """The required sources that are not there at all (under the weights root)."""
    return [source for source in required_sources(variant) if not source.marker(root).is_file()]


_logged_unverified: set[Path] = set()


def damaged(variant: Variant, root: Path) -> list[manifest.Problem]:
    """Files the variant loads that are missing or of the wrong size (the optional tiny
    autoencoder's too, when its folder is there)."""
    problems = []
    for source in sources(variant):
        folder = source.folder(root)
        if source.optional and not folder.is_dir():
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
            problems += manifest.check_without_manifest(folder, source.covers)
        else:
            problems += manifest.check(folder, manifest.restricted(listed, source.covers))
        if source.role == MODEL:
            problems += manifest.check_components(folder, source.skip)
    return problems


def require_weights(variant: Variant, root: Path) -> None:
    """Fail with one message that names every missing or damaged file and the command that fetches them."""
    absent = missing(variant, root)
    if absent:
        listed = ", ".join(str(source.marker(root)) for source in absent)
        raise WeightsMissing(
            f"Weights for variant {variant.name} are missing: {listed}. Fetch them with: {fetch_command(variant)}"
        )
    problems = damaged(variant, root)
    if problems:
        listed = ", ".join(str(problem) for problem in problems)
        raise WeightsMissing(
            f"Weights for variant {variant.name} are damaged: {listed}. Fetch them again with: {fetch_command(variant)}"
        )


def ensure_weights(variant: Variant, settings: Settings, url: str | None = None) -> None:
    """Make sure the variant's weights are on disk before loading: the one entry point setup() uses.

    What is there is only checked (sizes against the manifest). What is missing is fetched: from
    the weights tar at url (Cog's setup(weights)) or FASTSD_WEIGHTS_URL, else from the hub when
    it answers; when neither works the error names the missing files and the ways to provide them.
    """
    root = settings.weights_root
    absent = missing(variant, root)
    if absent:
        url = url or settings.weights_url
        if url:
            optional = [
                _relative(source, root)
                for source in sources(variant)
                if source.optional and not source.folder(root).is_dir()
            ]
            needed = [_relative(source, root) for source in absent]
            fetch.fetch_archive(url, root, needed, optional, log.info, settings.download_workers, settings.no_pget)
        else:
            _fetch_from_hub(variant, absent, settings)
    require_weights(variant, root)


def _relative(source: Source, root: Path) -> Path:
    if source.is_local:
        raise WeightsMissing(f"{source.marker(root)} is missing, and a local model folder cannot be fetched.")
    return source.relative_folder


def _fetch_from_hub(variant: Variant, absent: list[Source], settings: Settings) -> None:
    listed = ", ".join(str(source.marker(settings.weights_root)) for source in absent)
    unfetchable = (
        f"Weights for variant {variant.name} are missing: {listed}. Fetch them with: "
        f"{fetch_command(variant)}, or set {WEIGHTS_URL_ENV} to a weights tar "
        f"({python_command()} scripts/pack_weights.py makes one)"
    )
    if settings.hub_offline:
        raise WeightsMissing(unfetchable + "; HF_HUB_OFFLINE is set, so the hub was not asked.")
    if any(source.is_local for source in absent):
        raise WeightsMissing(unfetchable + ".")
    log.info("weights missing (%s): fetching them from the hub (%s)", listed, settings.hub)
    try:
        download.fetch_variant(variant, settings, progress=False, report=log.info)
    except download.WeightsDownloadError as error:
        raise WeightsMissing(f"{unfetchable}; fetching from the hub failed: {error}") from None


def _acceleration_folders() -> set[Path]:
    """Every folder a custom model may need besides its own: the LoRAs and UNets of every recipe,
    the tiny autoencoders and the fp16-safe SDXL VAE (relative to the weights root)."""
    folders = {Path("weights") / hub_id for hub_id in (*TINY_VAE_FOR.values(), SDXL_VAE_FP16_FIX)}
    for recipe in all_recipes():
        folders |= {Path("lora") / lora.file.repo for lora in recipe.loras}
        if recipe.unet:
            folders.add(Path("weights") / recipe.unet.repo)
    return folders


def ensure_model_folder(model: str, settings: Settings, url: str | None = None) -> None:
    """For a custom model (FASTSD_MODEL) named by hub id: fetch its folder before anything reads
    its configs (custom_variant detects the architecture from them), from the weights tar at url
    or FASTSD_WEIGHTS_URL (with the acceleration files and tiny autoencoders it holds), else from
    the hub. A local folder, or one already there, is left alone."""
    root = settings.weights_root
    folder = model_folder(root, model)
    if is_local_path(model) or (folder / "model_index.json").is_file():
        return
    url = url or settings.weights_url
    if url:
        optional = [extra for extra in sorted(_acceleration_folders()) if not (root / extra).is_dir()]
        relative = [folder.relative_to(root)]
        fetch.fetch_archive(url, root, relative, optional, log.info, settings.download_workers, settings.no_pget)
        return
    acceleration = f" --acceleration {settings.acceleration}" if settings.acceleration else ""
    command = f"{python_command()} scripts/download_weights.py --model {model}{acceleration}"
    if settings.hub_offline:
        raise WeightsMissing(
            f"The weights of {model} are missing ({folder}). Fetch them with: {command}, or set "
            f"{WEIGHTS_URL_ENV} to a weights tar; HF_HUB_OFFLINE is set, so the hub was not asked."
        )
    log.info("weights of %s missing: fetching them from the hub (%s)", model, settings.hub)
    try:
        download.fetch_source(Source(MODEL, model), settings, progress=False)
    except download.WeightsDownloadError as error:
        raise WeightsMissing(
            f"The weights of {model} are missing ({folder}). Fetch them with: {command}, or set "
            f"{WEIGHTS_URL_ENV} to a weights tar; fetching from the hub failed: {error}"
        ) from None
