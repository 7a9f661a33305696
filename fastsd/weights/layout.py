"""Where weights live on disk, and which of them a preset loads.

Folders mirror hub ids: weights/<hub id>/ for models, VAEs and replacement UNets, lora/<hub id>/
for LoRAs, under the weights root (Settings.weights_root: the project folder, or
FASTSD_WEIGHTS_ROOT). A file out of a repo that holds many (a LoRA, a Lightning UNet) keeps the
repo's own file name inside that folder. A local folder may also be named directly as a custom
model.

A Source is one thing a preset loads: a whole repo (a diffusers pipeline, a bare autoencoder) or
one file of it. Everything that checks, fetches, packs or bakes weights works from sources(), so
a new recipe needs no code here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..variants import NSFW_CLASSIFIER_REPO, SAFETY_CHECKER_REPO, SINGLE_FILE_CONTROLNETS, Variant

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent  # fastsd/weights/layout.py -> the project

# Roles: what a source is to the pipeline.
MODEL, VAE, TINY_VAE, UNET, LORA, CONTROLNET = "model", "vae", "tiny_vae", "unet", "lora", "controlnet"
SAFETY_CHECKER, NSFW_CLASSIFIER = "safety_checker", "nsfw_classifier"
# The SD1.5 repo's folders that the safety checker is: the rest of that repo is a model.
SAFETY_CHECKER_FOLDERS = ("safety_checker/", "feature_extractor/")


def is_local_path(model: str) -> bool:
    return Path(model).expanduser().is_absolute() or model.startswith(".")


def model_folder(root: Path, model: str) -> Path:
    """The folder of a model named by hub id (under root/weights/) or by a local path."""
    if is_local_path(model):
        return Path(model).expanduser()
    return root / "weights" / model


def repo_folder(root: Path, role: str, repo: str) -> Path:
    if role == MODEL and is_local_path(repo):
        return model_folder(root, repo)
    return root / ("lora" if role == LORA else "weights") / repo


@dataclass(frozen=True)
class Source:
    role: str
    repo: str
    filename: str | None = None  # one file of the repo; None: the repo's diffusers layout
    skip: tuple[str, ...] = ()  # model components the preset replaces: their weights are not loaded
    optional: bool = False  # loaded when present (the tiny autoencoder)

    def folder(self, root: Path) -> Path:
        return repo_folder(root, self.role, self.repo)

    @property
    def relative_folder(self) -> Path:
        """The folder under the weights root (what a weights tar and .dockerignore name)."""
        return Path("lora" if self.role == LORA else "weights") / self.repo

    @property
    def parts(self) -> tuple[str, ...]:
        """What the source is of a folder that holds more: its file, or its subfolders (ending in
        /); empty when it is the whole folder."""
        if self.filename:
            return (self.filename,)
        return SAFETY_CHECKER_FOLDERS if self.role == SAFETY_CHECKER else ()

    @property
    def marker_name(self) -> str:
        """The file whose presence says the source is there at all."""
        if self.role == SAFETY_CHECKER:
            return "safety_checker/config.json"
        return self.filename or ("model_index.json" if self.role == MODEL else "config.json")

    def marker(self, root: Path) -> Path:
        return self.folder(root) / self.marker_name

    @property
    def is_local(self) -> bool:
        """A custom model given as a local folder: nothing to fetch, pack or bake."""
        return self.role == MODEL and is_local_path(self.repo)

    def covers(self, name: str) -> bool:
        """Whether a file of the folder (its path relative to the folder) is one this source loads."""
        if self.parts:
            return any(name == part or (part.endswith("/") and name.startswith(part)) for part in self.parts)
        # A replaced component keeps its configs (the Lightning UNet is built from the base's).
        return not (name.split("/", 1)[0] in self.skip and name.endswith(".safetensors"))

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}" if self.filename else self.repo


def sources(variant: Variant, tiny_vae: bool = True) -> list[Source]:
    """Everything the variant loads: its model (less the components it replaces), the replacement
    VAE and UNet, the LoRAs it fuses, the ControlNets it serves, the two safety checkers (unless
    switched off), then its tiny autoencoder (optional: loaded when present; fetched, packed and
    baked unless tiny_vae=False)."""
    recipe = variant.recipe
    replaced = tuple(name for name, by in (("unet", recipe.unet), ("vae", variant.vae)) if by)
    found = [Source(MODEL, variant.model, skip=replaced)]
    if variant.vae:
        found.append(Source(VAE, variant.vae))
    if recipe.unet:
        found.append(Source(UNET, recipe.unet.repo, recipe.unet.filename))
    found += [Source(LORA, lora.file.repo, lora.file.filename) for lora in recipe.loras]
    for repo in dict.fromkeys(variant.controlnet_repo(name) for name in variant.controlnets):  # a union: once
        single = SINGLE_FILE_CONTROLNETS.get(repo)
        found += ([Source(CONTROLNET, repo, single.filename), Source(CONTROLNET, single.config_repo, "config.json")]
                  if single else [Source(CONTROLNET, repo)])  # fmt: skip
    if variant.safety_checker:
        found += [Source(SAFETY_CHECKER, SAFETY_CHECKER_REPO), Source(NSFW_CLASSIFIER, NSFW_CLASSIFIER_REPO)]
    if tiny_vae:
        found.append(Source(TINY_VAE, variant.tiny_vae, optional=True))
    return found


def required_sources(variant: Variant) -> list[Source]:
    return [source for source in sources(variant) if not source.optional]


def python_command() -> str:
    """How a person at the project's root runs this Python: the project's .venv where this is it
    (a bare `python` there lacks fastsd), else `python` (the image's)."""
    venv = PROJECT_ROOT / ".venv"
    return ".venv/bin/python" if Path(sys.prefix).resolve() == venv.resolve() else "python"


def fetch_command(variant: Variant) -> str:
    controlnets = f" --controlnet {','.join(variant.controlnets)}" if variant.controlnets else ""
    controlnets += "" if variant.safety_checker else " --no-safety-checker"
    script = f"{python_command()} scripts/download_weights.py"
    if variant.is_custom:
        acceleration = f" --acceleration {variant.recipe.name}" if variant.has_unet else ""
        return f"{script} --model {variant.model}{acceleration}{controlnets}"
    return f"{script} {variant.name}{controlnets}"
