"""Fixtures: tiny random-weight models in the real hub layouts, built once per test session."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from fastsd import random_models, variants


@pytest.fixture(scope="session")
def weights_root(tmp_path_factory) -> Path:
    """A project root holding weights/<hub id> and lora/<hub id> for every variant's repos."""
    root = tmp_path_factory.mktemp("fastsd-root")
    hub_ids = {hub for variant in variants.VARIANTS.values() for hub in [*variant.hub_ids.values(), variant.tiny_vae]}
    for hub_id in sorted(hub_ids):
        random_models.build(hub_id, root)
    return root


@pytest.fixture
def use_weights(weights_root, monkeypatch) -> Path:
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    return weights_root


def png_bytes(width: int, height: int, color=(200, 40, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()
