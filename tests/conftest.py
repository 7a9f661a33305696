"""Fixtures: tiny random-weight models in the real hub layouts, built once per test session."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
from PIL import Image

from fastsd import variants
from fastsd_testing import random_models


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory) -> Path:
    """A project root holding weights/ and lora/ for every preset, the acceleration files of every
    custom acceleration (for the fine-tune tests), and every ControlNet."""
    root = tmp_path_factory.mktemp("fastsd-root")
    for variant in variants.VARIANTS.values():
        random_models.build_variant(variant, root)
    for recipe in variants.all_recipes():
        for lora in recipe.loras:
            if not (root / "lora" / lora.file.repo / lora.file.filename).exists():
                random_models.build_lora_file(lora.file, root)
    for repo in random_models.CONTROLNET_REPOS:  # as download_weights.py leaves them
        random_models.build_controlnet_repo(repo, root)
    return root


@pytest.fixture
def use_weights(weights_root, monkeypatch) -> Path:
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    return weights_root


def load_engine(weights_root: Path, name: str):
    """A preset's engine on the tiny weights, in fp32 on the CPU."""
    import torch

    from fastsd.engine import Engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
        return Engine.load(variants.VARIANTS[name], "cpu", torch.float32)


def png_bytes(width: int, height: int, color=(200, 40, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def script_module(relative_path: str):
    """A script of the project (scripts/*.py, .github/scripts/*.py) imported as a module by its path."""
    path = PROJECT_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
