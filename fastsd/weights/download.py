"""Fetching a variant's weights from the Hugging Face hub: exactly the files the pipeline loads.

The file selection is a pure function of a repo's file list (select_files), so it is tested
offline against the real repos' lists. The transfer itself is huggingface_hub's
snapshot_download into weights/<hub id>/ (lora/<hub id>/ for LoRAs): Xet transfers (hf_xet)
with its progress bar, resume of interrupted files, HF_TOKEN for gated repos. After the transfer
every file is checked against the sizes the hub reported and the folder's manifest
(fastsd.weights.manifest), which setup() checks at every boot, gains their entries: presets that take
different files of one repo (Hyper-SD's SD1.5 and SDXL LoRAs) share its folder.

Failures a person can fix (hub unreachable, repo gated or not found) come back as one
WeightsDownloadError sentence, within seconds: the first call to the hub is model_info with a
short timeout and no retries, so an unreachable hub is known before any download starts.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError
from ..settings import Settings
from ..variants import LORA_WEIGHT_NAME, Variant, custom_variant
from . import manifest
from .layout import (
    CONTROLNET,
    LORA,
    MODEL,
    NSFW_CLASSIFIER,
    SAFETY_CHECKER,
    TINY_VAE,
    VAE,
    Source,
    model_folder,
    sources,
)

log = logging.getLogger(__name__)
# The weight files diffusers reads: diffusers models and transformers models. Root-level
# single-file checkpoints (sd_turbo.safetensors, sdxl_vae.safetensors, ...) have other names.
WEIGHT_BASENAMES = {"diffusion_pytorch_model", "model"}
_WEIGHT = re.compile(r"^(?P<base>[A-Za-z0-9_]+)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d+-of-\d+)?\.safetensors$")
_WEIGHT_INDEX = re.compile(r"^(?P<base>[A-Za-z0-9_]+)\.safetensors\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
FP16, FULL = "fp16", "full"
# Some ControlNets (the SD 2.1 ones) are published only as a pickle: fastsd never unpickles while
# serving, so download_weights.py converts it to safetensors once, on the operator's machine.
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
CONVERTED_WEIGHTS = "diffusion_pytorch_model.safetensors"
PRECISIONS = (FP16, FULL)

# Reads of a stalled connection give up after this many seconds (the library's default is 10).
DOWNLOAD_TIMEOUT_S = 30


class WeightsDownloadError(ConfigurationError):
    """The weights could not be fetched; the message says why and what to do, in one sentence."""


# --- which files --------------------------------------------------------------------------------


def _split(path: str) -> tuple[str, str]:
    folder, _, name = path.rpartition("/")
    return folder, name


def _weight_sets(names: list[str]) -> dict[str | None, list[str]]:
    """The safetensors weights of one folder (with their shard index files), by precision variant:
    {None: full-precision files, "fp16": fp16 files}. Other variants (non_ema, ema, ...) and other
    formats (.bin, .ckpt, .msgpack, .onnx, OpenVINO .xml/.bin) are not diffusers' default load."""
    sets: dict[str | None, list[str]] = {}
    for name in names:
        match = _WEIGHT.match(name) or _WEIGHT_INDEX.match(name)
        if not match or match["base"] not in WEIGHT_BASENAMES or match["variant"] not in (None, FP16):
            continue
        sets.setdefault(match["variant"], []).append(name)
    # An index alone (shards absent) is no weights at all.
    return {variant: files for variant, files in sets.items() if any(f.endswith(".safetensors") for f in files)}


# Configs, tokenizer and scheduler files: JSON and text, a chat template (Qwen3's), a SentencePiece
# model (T5's spiece.model: a protobuf, not a pickle).
_CONFIG_SUFFIXES = (".json", ".txt", ".jinja", ".model")


def _config_files(names: list[str]) -> list[str]:
    """Configs, tokenizer and scheduler files: the small files next to the weights."""
    return [name for name in names if name.endswith(_CONFIG_SUFFIXES) and not _WEIGHT_INDEX.match(name)]


def select_files(
    role: str,
    repo_files: list[str] | set[str],
    model_index: dict | None = None,
    precision: str = FP16,
    *,
    filename: str | None = None,
    skip: tuple[str, ...] = (),
) -> list[str]:
    """The files of a hub repo that fastsd loads for a repo in this role, sorted.

    filename: one file out of a repo that holds many (a LoRA, a Lightning UNet): that file only.
    skip: model components a preset replaces (its own VAE, its UNet): their configs only.

    model: model_index.json and, for each component it lists (but safety_checker and
      feature_extractor), the configs, tokenizer files and the safetensors weights; fp16 weights
      when every component with weights has them (what pipelines.weights_variant then loads),
      else the full-precision ones. model_index (the repo's model_index.json) is required.
      precision="full" prefers the full-precision weights instead (for CPU deployments, where
      they load without a cast: docs/weights.md, "Cold boot", has the numbers).
    vae, tiny_vae: a bare autoencoder at the repo root: config.json and its full-precision
      safetensors (the loader asks for no variant), fp16 only if that is all there is.
    lora: pytorch_lora_weights.safetensors, unless filename names another.
    safety_checker: out of a pipeline repo, safety_checker/ (config and weights, fp16 where
      published unless precision="full") and feature_extractor/preprocessor_config.json.
    nsfw_classifier: a transformers image classifier: config.json, preprocessor_config.json and
      its full-precision safetensors weights.
    """
    files = sorted(set(repo_files))
    if role == LORA and filename is None:
        filename = LORA_WEIGHT_NAME
    if filename is not None:
        if filename not in files:
            raise WeightsDownloadError(f"the repo has no {filename}, the file fastsd loads from it")
        return [filename]
    by_folder: dict[str, list[str]] = {}
    for path in files:
        folder, name = _split(path)
        by_folder.setdefault(folder, []).append(name)
    if role in (VAE, TINY_VAE, CONTROLNET):
        return _select_bare_model(role, by_folder.get("", []), precision)
    if role == SAFETY_CHECKER:
        return _select_safety_checker(by_folder, precision)
    if role == NSFW_CLASSIFIER:
        return _select_classifier(by_folder.get("", []))
    if role != MODEL:
        raise ValueError(f"unknown role {role!r} without a filename")
    return _select_pipeline(by_folder, model_index, precision, skip)


def _preferred(sets: dict[str | None, list[str]], first: str | None) -> list[str]:
    """The weight files of the preferred variant (fp16 or full, None), else of the other."""
    second = None if first == FP16 else FP16
    return sets.get(first) or sets.get(second) or []


def _select_bare_model(role: str, names: list[str], precision: str) -> list[str]:
    """A bare autoencoder or ControlNet at the repo root: its config and weights. The autoencoders
    load without a variant (full precision); ControlNets the way the pipeline's precision asks."""
    if "config.json" not in names:
        raise WeightsDownloadError("the repo has no config.json at its root: it is not a diffusers model")
    weights = _preferred(_weight_sets(names), FP16 if role == CONTROLNET and precision == FP16 else None)
    if not weights and role == CONTROLNET and PICKLED_WEIGHTS in names:
        return ["config.json", PICKLED_WEIGHTS]  # converted to safetensors once fetched: fetch_source
    if not weights:
        raise WeightsDownloadError("the repo has no diffusion_pytorch_model.safetensors at its root")
    return sorted(["config.json", *weights])


def _select_safety_checker(by_folder: dict[str, list[str]], precision: str) -> list[str]:
    checker, extractor = by_folder.get("safety_checker", []), by_folder.get("feature_extractor", [])
    if "config.json" not in checker or "preprocessor_config.json" not in extractor:
        raise WeightsDownloadError("the repo has no safety_checker/config.json and feature_extractor/")
    weights = _preferred(_weight_sets(checker), FP16 if precision == FP16 else None)
    if not weights:
        raise WeightsDownloadError("the repo has no safety_checker/model.safetensors")
    chosen = ["config.json", *weights]
    return sorted([*(f"safety_checker/{name}" for name in chosen), "feature_extractor/preprocessor_config.json"])


def _select_classifier(names: list[str]) -> list[str]:
    if "config.json" not in names or "preprocessor_config.json" not in names:
        raise WeightsDownloadError("the repo has no config.json and preprocessor_config.json at its root")
    weights = _preferred(_weight_sets(names), None)
    if not weights:
        raise WeightsDownloadError("the repo has no model.safetensors at its root")
    return sorted(["config.json", "preprocessor_config.json", *weights])


def _select_pipeline(
    by_folder: dict[str, list[str]], model_index: dict | None, precision: str, skip: tuple[str, ...]
) -> list[str]:
    """A diffusers pipeline: model_index.json, and each loaded component's configs and weights, fp16
    where every component with weights has them (unless precision is full and all have those)."""
    if "model_index.json" not in by_folder.get("", []) or model_index is None:
        raise WeightsDownloadError("the repo has no model_index.json: it is not a diffusers pipeline")
    components = sorted(
        name
        for name, spec in model_index.items()
        if isinstance(spec, list) and spec and spec[0] is not None and name not in manifest.UNLOADED_COMPONENTS
    )
    # A replaced component (skip) keeps its configs, and its weights are neither fetched nor counted.
    weight_sets = {c: _weight_sets(by_folder.get(c, [])) if c not in skip else {} for c in components}
    with_weights = [component for component, sets in weight_sets.items() if sets]
    use_fp16 = bool(with_weights) and all(FP16 in weight_sets[c] for c in with_weights)
    if precision == FULL and all(None in weight_sets[c] for c in with_weights):
        use_fp16 = False
    selected = ["model_index.json"]
    for component in components:
        names = by_folder.get(component, [])
        if not names:
            raise WeightsDownloadError(f"model_index.json lists {component} but the repo has no {component}/ folder")
        chosen = _config_files(names)
        sets = weight_sets[component]
        if sets:
            chosen += sets[FP16] if use_fp16 else (sets.get(None) or sets[FP16])
        selected += [f"{component}/{name}" for name in chosen]
    return sorted(selected)


# --- the repos of a variant ---------------------------------------------------------------------


@dataclass
class Fetched:
    hub_id: str
    folder: Path
    files: int
    size: int
    already_there: bool
    seconds: float


def _hub():
    """huggingface_hub, imported late (it reads its own variables at import)."""
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_DOWNLOAD_TIMEOUT == constants.DEFAULT_DOWNLOAD_TIMEOUT:  # the person's choice wins
        constants.HF_HUB_DOWNLOAD_TIMEOUT = DOWNLOAD_TIMEOUT_S
    return huggingface_hub


def explain(error: Exception, hub_id: str, endpoint: str = "https://huggingface.co") -> WeightsDownloadError:
    """One sentence for an error of huggingface_hub or the network: what happened, what to do."""
    if isinstance(error, WeightsDownloadError):
        return error
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.GatedRepoError):
        return WeightsDownloadError(
            f"{hub_id} is gated: accept its conditions at {endpoint}/{hub_id} with your account, then set HF_TOKEN "
            "to a read token of that account and run the command again."
        )
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return WeightsDownloadError(
            f"{hub_id} was not found on the hub ({endpoint}): check the id, or set HF_TOKEN if it is a private repo."
        )
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return WeightsDownloadError(f"{hub_id} has no such revision on the hub.")
    if isinstance(error, hub_errors.OfflineModeIsEnabled):
        return WeightsDownloadError(
            f"Cannot fetch {hub_id}: HF_HUB_OFFLINE is set; unset it, or copy the weights into place by other means."
        )
    if isinstance(error, hub_errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return WeightsDownloadError(
                f"The hub refused {hub_id} (HTTP {status}): HF_TOKEN is missing, wrong or lacks access to this repo."
            )
        return WeightsDownloadError(
            f"The hub answered HTTP {status} for {hub_id}; try again later ({str(error).splitlines()[0]})."
        )
    if isinstance(error, (OSError, ConnectionError)) or type(error).__module__.startswith(("httpx", "httpcore")):
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return WeightsDownloadError(
            f"The Hugging Face hub ({endpoint}) cannot be reached ({reason}) while fetching {hub_id}: check the "
            "network, HF_ENDPOINT or a proxy, or bring a weights tar instead (FASTSD_WEIGHTS_URL; docs/weights.md)."
        )
    return WeightsDownloadError(f"Fetching {hub_id} failed: {type(error).__name__}: {error}")


def _expected_entries(info, selected: list[str]) -> dict[str, dict]:
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    entries = {}
    for name in selected:
        sibling = siblings[name]
        entry: dict = {"size": sibling.size}
        if sibling.lfs is not None:
            entry["sha256"] = sibling.lfs.sha256
        elif sibling.blob_id:
            entry["git_sha1"] = sibling.blob_id
        entries[name] = entry
    return entries


def _converted_entry(listed: dict | None, pickled: dict) -> dict | None:
    """The manifest entry of a conversion already made from this very pickle (same hub sha256)."""
    entry = (listed or {}).get("files", {}).get(CONVERTED_WEIGHTS)
    if entry and entry.get("converted_from", {}).get("sha256") == pickled.get("sha256"):
        return {CONVERTED_WEIGHTS: entry}
    return None


def _convert_pickle(folder: Path, hub_id: str, pickled: dict) -> dict[str, dict]:
    """The pickled weights as safetensors, once, here: torch.load with weights_only, which rebuilds
    tensors and plain containers and refuses anything else (no code runs), then the pickle goes.
    The manifest records the source file and its hub sha256 beside the converted file."""
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise WeightsDownloadError(
            f"{hub_id} publishes its weights only as a pickle ({PICKLED_WEIGHTS}): converting them to "
            "safetensors once needs torch on this machine (pip install torch; the CPU build does), or leave "
            "this ControlNet out."
        ) from None
    try:
        state = torch.load(folder / PICKLED_WEIGHTS, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a refused or broken pickle is one sentence
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsDownloadError(f"{hub_id}: {PICKLED_WEIGHTS} is not plain tensors ({reason}).") from None
    target = folder / CONVERTED_WEIGHTS
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, target)
    (folder / PICKLED_WEIGHTS).unlink()
    entry = {"size": target.stat().st_size, "sha256": manifest.sha256_of(target)}
    return {CONVERTED_WEIGHTS: {**entry, "converted_from": {"file": PICKLED_WEIGHTS, **pickled}}}


def _escape_glob(name: str) -> str:
    """allow_patterns are fnmatch patterns: make a file name match only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def fetch_source(
    source: Source, settings: Settings, *, verify: bool = False, progress: bool = True, precision: str = FP16
) -> Fetched:
    """Fetch one source's files into its folder, check them, add them to the folder's manifest."""
    started = time.perf_counter()
    hub_id, folder = source.repo, source.folder(settings.weights_root)
    try:
        info, selected, expected, previous = _listing(source, settings, folder, precision)
        if _already_there(folder, expected, previous):
            return Fetched(hub_id, folder, len(expected), _wanted_size(expected, previous), True,
                           time.perf_counter() - started)  # fmt: skip
        _download(hub_id, info.sha, folder, selected, settings, progress)
    except Exception as error:  # noqa: BLE001 - every failure becomes one sentence for a person
        raise explain(error, hub_id, settings.hub) from error
    problems = (manifest.verify if verify else manifest.check)(folder, {"files": expected})
    if problems:
        raise WeightsDownloadError(
            f"{hub_id} arrived damaged: {', '.join(map(str, problems))}; run the command again to fetch it again."
        )
    if PICKLED_WEIGHTS in expected:
        pickled = expected.pop(PICKLED_WEIGHTS)
        expected |= _convert_pickle(folder, hub_id, pickled)
    # Other presets may have fetched other files of this repo into the folder: keep their entries.
    kept = previous["files"] if previous and previous.get("repo") == hub_id else {}
    manifest.write(folder, {**kept, **expected}, repo=hub_id, revision=info.sha, source=settings.hub)
    size = manifest.total_size({"files": expected})
    return Fetched(hub_id, folder, len(expected), size, False, time.perf_counter() - started)


def _listing(source: Source, settings: Settings, folder: Path, precision: str):
    """The repo's listing (the first call to the hub: short, so that an unreachable hub is reported
    in seconds), the files fastsd loads from it, their expected entries, and the folder's manifest."""
    hub = _hub()
    api = hub.HfApi(endpoint=settings.hub, token=settings.hub_token)
    info = api.model_info(source.repo, files_metadata=True, timeout=settings.hub_timeout_s)
    repo_files = [sibling.rfilename for sibling in info.siblings or []]
    model_index = None
    if source.role == MODEL:
        if "model_index.json" not in repo_files:
            raise WeightsDownloadError(f"{source.repo} has no model_index.json: it is not a diffusers pipeline repo.")
        index_path = hub.hf_hub_download(source.repo, "model_index.json", revision=info.sha, local_dir=folder,
                                         token=settings.hub_token, endpoint=settings.hub)  # fmt: skip
        model_index = json.loads(Path(index_path).read_text())
    try:
        selected = select_files(
            source.role, repo_files, model_index, precision, filename=source.filename, skip=source.skip
        )
    except WeightsDownloadError as error:
        raise WeightsDownloadError(f"{source.repo}: {error}.") from None
    previous = manifest.load(folder) if folder.is_dir() else None
    return info, selected, _expected_entries(info, selected), previous


def _wanted(expected: dict, previous: dict | None) -> dict:
    """The manifest entries the folder must hold: the expected ones, a ControlNet's pickle as the
    safetensors it was converted to."""
    if PICKLED_WEIGHTS not in expected:
        return {"files": expected}
    converted = _converted_entry(previous, expected[PICKLED_WEIGHTS])
    return {"files": {**{n: e for n, e in expected.items() if n != PICKLED_WEIGHTS}, **(converted or {})}}


def _wanted_size(expected: dict, previous: dict | None) -> int:
    return manifest.total_size(_wanted(expected, previous))


def _already_there(folder: Path, expected: dict, previous: dict | None) -> bool:
    """Every expected file is in the manifest and on disk at its size. A file of the wrong size
    (truncated by a full disk, edited) is removed, so that the library fetches it again instead of
    trusting its own metadata."""
    wanted = _wanted(expected, previous)
    if PICKLED_WEIGHTS in expected:
        listed = _converted_entry(previous, expected[PICKLED_WEIGHTS]) is not None
    else:
        listed = previous is not None and all(previous["files"].get(n) == entry for n, entry in expected.items())
    problems = manifest.check(folder, wanted)
    if listed and not problems:
        return True
    for problem in problems:
        if problem.path.exists():
            problem.path.unlink()
    return False


def _download(hub_id: str, revision: str, folder: Path, selected: list[str], settings: Settings, progress: bool):
    hub = _hub()
    if not progress:
        hub.utils.disable_progress_bars()
    try:
        hub.snapshot_download(
            hub_id,
            revision=revision,
            local_dir=folder,
            allow_patterns=[_escape_glob(n) for n in selected],
            token=settings.hub_token,
            endpoint=settings.hub,
            etag_timeout=settings.hub_timeout_s,
        )
    finally:
        if not progress:
            hub.utils.enable_progress_bars()


def fetch_variant(
    variant: Variant,
    settings: Settings,
    *,
    tiny_vae: bool = True,
    verify: bool = False,
    progress: bool = True,
    precision: str = FP16,
    report=print,
    done: dict[Source, Fetched] | None = None,
) -> list[Fetched]:
    """Fetch every source of the variant; done (shared across variants) skips sources fetched already."""
    done = {} if done is None else done
    results = []
    for source in sources(variant, tiny_vae=tiny_vae):
        if source in done:
            continue
        if source.is_local:
            report(f"  {source.repo}: a local folder, nothing to fetch")
            continue
        result = fetch_source(source, settings, verify=verify, progress=progress, precision=precision)
        done[source] = result
        state = "already there" if result.already_there else f"fetched in {result.seconds:.0f} s"
        report(f"  {source}: {result.files} files, {format_size(result.size)} -> {result.folder} ({state})")
        results.append(result)
    return results


def resolve_custom(model: str, acceleration: str | None, settings: Settings) -> Variant:
    """The variant for a custom base model: fetch its model_index.json and its denoiser's config
    (unet/ or transformer/), detect the architecture from them, and pick the recipe."""
    hub = _hub()
    folder = model_folder(settings.weights_root, model)
    if folder.is_absolute() and (folder / "model_index.json").is_file():
        return custom_variant(model, folder, acceleration)
    token, endpoint = settings.hub_token, settings.hub
    try:
        api = hub.HfApi(endpoint=endpoint, token=token)
        info = api.model_info(model, timeout=settings.hub_timeout_s)
        index = hub.hf_hub_download(model, "model_index.json", revision=info.sha, local_dir=folder, token=token,
                                    endpoint=endpoint)  # fmt: skip
        denoiser = "transformer" if "transformer" in json.loads(Path(index).read_text()) else "unet"
        hub.hf_hub_download(model, f"{denoiser}/config.json", revision=info.sha, local_dir=folder, token=token,
                            endpoint=endpoint)  # fmt: skip
    except Exception as error:  # noqa: BLE001
        raise explain(error, model, endpoint) from error
    return custom_variant(model, folder, acceleration)


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    raise AssertionError


__all__ = ["WeightsDownloadError", "select_files", "fetch_source", "fetch_variant", "resolve_custom", "explain"]
