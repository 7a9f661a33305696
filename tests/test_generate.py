"""scripts/generate.py, as the README's quick start runs it: an image from the command line, and a
newcomer without weights told both ways to get some."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from fastsd_testing.cog_server import PROJECT_ROOT

GENERATE = PROJECT_ROOT / "scripts" / "generate.py"


def _run(arguments: list[str], **environment) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, GENERATE, *arguments],
        env=dict(os.environ, **environment),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_generate_writes_the_image_it_names(weights_root, tmp_path):
    result = _run(["a lighthouse", "--width", "64", "--height", "64", "--seed", "7", "--out", str(tmp_path)],
                  FASTSD_WEIGHTS_ROOT=str(weights_root))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    [written] = result.stdout.split()
    assert written.endswith("sd-turbo-7.webp")
    assert Image.open(written).size == (64, 64)


@pytest.mark.slow
def test_missing_weights_name_the_download_and_the_random_model(tmp_path):
    # A hub that refuses at once (a closed loopback port): no network is needed to see the advice.
    result = _run(["a lighthouse"], FASTSD_WEIGHTS_ROOT=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 2
    assert "python scripts/download_weights.py sd-turbo" in result.stderr
    assert "python -m fastsd_testing.random_models sd-turbo" in result.stderr
