"""What many tests share: an engine on the tiny weights, small images, the project's scripts as
modules, the settings a test runs with. (tests/conftest.py holds only pytest's fixtures.)"""

from __future__ import annotations

import importlib.util
import io
import re
import time
from pathlib import Path
from typing import Any

from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def settings_for(weights_root: Path, **changes: Any):
    """The settings the environment gives (a test may have set variables), on this weights root."""
    from fastsd.settings import Settings

    return Settings.from_environment(weights_root=weights_root, **changes)


def current_root() -> Path:
    """The weights root the environment names now (tests point FASTSD_WEIGHTS_ROOT at their own)."""
    from fastsd.settings import Settings

    return Settings.from_environment().weights_root


def load_engine(weights_root: Path, name: str, **settings: Any):
    """A preset's engine on the tiny weights, in fp32 on the CPU."""
    import torch

    from fastsd import variants
    from fastsd.engine import Engine

    return Engine.load(variants.VARIANTS[name], settings_for(weights_root, **settings), "cpu", torch.float32)


def png_bytes(width: int, height: int, color=(200, 40, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def script_module(relative_path: str):
    """A script of the project (scripts/*.py, .github/scripts/*.py) imported as a module by its path."""
    path = PROJECT_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(condition, what: str, timeout: float = 60) -> None:
    """Polls a condition of a server's state: never a timing assumption, it waits for the state."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule, enough for these patterns: the last pattern that matches the
    path or one of its parent folders decides; `!` re-includes; `**` spans folders."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded
