"""Fixtures: tiny random-weight models in the real hub layouts, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

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


# --- the tiers (scripts/test --quick runs neither server nor browser nor slow tests) ------------------

# What a test (or a fixture it uses) calls that starts a server process or a browser.
_SERVER_CALLS = ("CogServer(", "ready_server(", '"scripts" / "serve"', "fastsd_testing.serve", '"fastsd.realtime"')


def _starts_a_server(function, seen: set | None = None) -> bool:
    """Whether the function's code, or that of a function of its module it calls (a helper that a
    fixture yields from), starts a server process or a browser."""
    import inspect
    import re

    seen = set() if seen is None else seen
    if function in seen:
        return False
    seen.add(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if any(call in source for call in _SERVER_CALLS):
        return True
    module = getattr(function, "__module__", None)
    helpers = (getattr(function, "__globals__", {}).get(name) for name in set(re.findall(r"(\w+)\(", source)))
    return any(
        inspect.isfunction(helper) and helper.__module__ == module and _starts_a_server(helper, seen)
        for helper in helpers
    )


def pytest_collection_modifyitems(config, items):
    """Marks every test that drives a real server process (`server`) or the browser (`browser`),
    read from its code and its fixtures' code: the tiers need no hand-kept list."""
    for item in items:
        fixtures = [
            definition.func for definitions in item._fixtureinfo.name2fixturedefs.values() for definition in definitions
        ]
        if _starts_a_server(item.function) or any(_starts_a_server(function) for function in fixtures):
            item.add_marker(pytest.mark.server)
        if item.module.__name__ == "test_realtime_browser":
            item.add_marker(pytest.mark.browser)
