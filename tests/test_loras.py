"""Per-request LoRAs through the real Cog server (sd15-lcm: the LCM-LoRA fused, a user's LoRA on top),
served from a loopback server with FASTSD_ALLOW_PRIVATE_URLS=1; a Replicate SDXL training tar and the
architecture checks in-process; and the URL rules with the setting off."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastsd import variants
from fastsd.engine import Engine, lora_refusal_of
from fastsd.errors import InputError
from fastsd.loras import references as loras
from fastsd.loras import remote
from fastsd.settings import Settings
from fastsd_testing.cog_server import CogServer, decode_output
from fastsd_testing.helpers import load_engine
from fastsd_testing.user_loras import (
    KOHYA,
    PEFT,
    FileServer,
    oversized_lora,
    pickle_lora,
    replicate_training_tar,
    write_user_lora,
)

SMALL = dict(width=64, height=64, num_inference_steps=2)
MAX_MB = 0.5  # the server's FASTSD_LORA_MAX_MB: the "oversized" file is just past it


def _read(path) -> bytes:
    return path.read_bytes()


def _unrelated() -> bytes:
    """A valid LoRA file whose layers exist in no Stable Diffusion UNet (its base cannot be read)."""
    from safetensors.torch import save

    name = "lora_unet_no_such_block_proj"
    return save({f"{name}.lora_down.weight": torch.ones(4, 8), f"{name}.lora_up.weight": torch.ones(8, 4)})


@pytest.fixture(scope="module")
def files(weights_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-loras")
    sd15 = weights_root / "weights" / variants.VARIANTS["sd15-lcm"].model
    sdxl = weights_root / "weights" / variants.VARIANTS["sdxl-turbo"].model
    return {
        "/style.safetensors": _read(write_user_lora(sd15, folder / "a.safetensors", text_encoder=True, seed=1)),
        "/style-unet-only.safetensors": _read(write_user_lora(sd15, folder / "b.safetensors", seed=1)),
        "/second.safetensors": _read(write_user_lora(sd15, folder / "c.safetensors", key_format=PEFT, seed=2)),
        "/someone/style-lora/resolve/main/pytorch_lora_weights.safetensors": _read(folder / "a.safetensors"),
        "/sdxl.safetensors": _read(write_user_lora(sdxl, folder / "d.safetensors", key_format=KOHYA, seed=3)),
        "/model.ckpt": pickle_lora(),
        "/renamed-pickle.safetensors": pickle_lora(),
        "/big.safetensors": oversized_lora(MAX_MB),
        "/truncated.safetensors": _read(folder / "c.safetensors")[:-100],
        "/unrelated.safetensors": _unrelated(),
    }


@pytest.fixture(scope="module")
def lora_server(files):
    with FileServer(files, redirects={"/moved": "/style.safetensors"}) as server:
        yield server


@pytest.fixture(scope="module")
def cog(weights_root, lora_server, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "loras.log"
    environment = {
        "FASTSD_VARIANT": "sd15-lcm",
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_ALLOW_PRIVATE_URLS": "1",
        "FASTSD_LORA_CACHE": str(tmp_path_factory.mktemp("lora-cache")),
        "FASTSD_LORA_MAX_MB": str(MAX_MB),
        "FASTSD_LORAS_LOADED": "3",
        "HF_ENDPOINT": lora_server.root,
    }
    server = CogServer(environment, log_path)
    try:
        assert server.wait_for_setup()["status"] == "READY", log_path.read_text()[-3000:]
        server.log_path = log_path
        yield server
    finally:
        server.stop()


def image(cog: CogServer, **inputs) -> np.ndarray:
    response = cog.predict(**{"prompt": "a lighthouse at dusk", "seed": 7, **SMALL, **inputs})
    assert response["status"] == "succeeded", response.get("error")
    return np.asarray(decode_output(response["output"][0])[1].convert("RGB"), dtype=int)


def failure(cog: CogServer, **inputs) -> str:
    response = cog.predict(prompt="a lighthouse at dusk", seed=7, **SMALL, **inputs)
    assert response["status"] == "failed", "expected the prediction to fail"
    assert cog.is_ready_again(), "the server must stay ready after a refused LoRA"
    return response["error"]


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a - b).mean() > 1.0


def test_a_lora_changes_the_image_and_the_next_request_without_it_gets_the_original(cog, lora_server):
    original = image(cog)
    styled = image(cog, lora_weights=lora_server.url("/style.safetensors"))
    assert differs(styled, original)
    assert np.array_equal(image(cog), original)  # adapters disabled, prompt cache not shared
    assert np.array_equal(image(cog, lora_weights=lora_server.url("/style.safetensors")), styled)


def test_lora_scale_zero_is_the_original_and_the_scale_matters(cog, lora_server):
    url = lora_server.url("/style.safetensors")
    original, full = image(cog), image(cog, lora_weights=url)
    assert np.array_equal(image(cog, lora_weights=url, lora_scale=0.0), original)
    half = image(cog, lora_weights=url, lora_scale=0.5)
    assert differs(half, original) and differs(half, full)


def test_the_text_encoder_part_applies_too(cog, lora_server):
    """The same UNet layers with and without text-encoder layers: different images."""
    with_text = image(cog, lora_weights=lora_server.url("/style.safetensors"))
    unet_only = image(cog, lora_weights=lora_server.url("/style-unet-only.safetensors"))
    assert differs(with_text, unet_only)


def test_two_loras_together(cog, lora_server):
    first = lora_server.url("/style.safetensors")
    second = lora_server.url("/second.safetensors")
    both = image(cog, lora_weights=first, extra_lora=second)
    assert differs(both, image(cog, lora_weights=first))
    assert differs(both, image(cog, lora_weights=second))
    assert differs(image(cog, lora_weights=second), image(cog))
    assert np.array_equal(
        image(cog, lora_weights=first, extra_lora=second, extra_lora_scale=0.0), image(cog, lora_weights=first)
    )
    error = failure(cog, lora_weights=first, extra_lora=first)
    assert "extra_lora is the same file as lora_weights" in error


def test_a_repeated_lora_is_neither_downloaded_nor_loaded_again(cog, lora_server):
    url = lora_server.url("/second.safetensors")
    image(cog, lora_weights=url)
    downloads = lora_server.requests["/second.safetensors"]
    loads = cog.log_path.read_text().count(f"loaded LoRA {url} ")
    image(cog, lora_weights=url, seed=8)
    assert lora_server.requests["/second.safetensors"] == downloads
    assert cog.log_path.read_text().count(f"loaded LoRA {url} ") == loads


def test_a_hugging_face_repo_id_and_a_redirect_reach_the_same_file(cog, lora_server):
    by_url = image(cog, lora_weights=lora_server.url("/style.safetensors"))
    assert np.array_equal(image(cog, lora_weights="someone/style-lora"), by_url)
    assert np.array_equal(image(cog, lora_weights="someone/style-lora/pytorch_lora_weights.safetensors"), by_url)
    assert np.array_equal(image(cog, lora_weights=lora_server.url("/moved")), by_url)


@pytest.mark.parametrize(
    "field, reference, expected",
    [
        ("lora_weights", "/model.ckpt", r"lora_weights is a pickle \(a \.bin, \.pt or \.ckpt file\); only safetensors"),
        ("lora_weights", "/renamed-pickle.safetensors", r"lora_weights is a pickle"),
        ("lora_weights", "/big.safetensors", r"lora_weights must be at most 0\.5 MiB; the file is"),
        ("lora_weights", "/truncated.safetensors", r"lora_weights is not a complete safetensors file"),
        ("extra_lora", "/sdxl.safetensors", r"extra_lora is a LoRA for SDXL models; sd15-lcm is an SD 1\.5 model"),
        ("lora_weights", "/unrelated.safetensors", r"lora_weights http\S+ does not fit [\w/.-]+: "),
        ("lora_weights", "/missing.safetensors", r"lora_weights could not be fetched: 127\.0\.0\.1 answered HTTP 404"),
        ("lora_weights", "nobody/no-such-lora", r"lora_weights: nobody/no-such-lora is not a public Hugging Face"),
        ("lora_weights", "/etc/passwd", r"lora_weights must be an https URL of a \.safetensors file or a Hugging"),
        ("extra_lora", "../../etc/passwd", r"extra_lora must be an https URL of a \.safetensors file or a Hugging"),
        ("lora_weights", "file:///etc/passwd", r"lora_weights must be an https URL"),
    ],
)
def test_bad_loras_fail_with_one_sentence_and_change_nothing(cog, lora_server, field, reference, expected):
    original = image(cog)
    served = reference.startswith("/") and reference.endswith((".ckpt", ".safetensors")) and "etc" not in reference
    error = failure(cog, **{field: lora_server.url(reference) if served else reference})
    assert re.search(expected, error), error
    assert "Traceback" not in error and "\n" not in error.strip()
    assert np.array_equal(image(cog), original)


def test_lora_scale_out_of_range_is_refused_by_name(cog, lora_server):
    error = cog.refusal(prompt="a lighthouse", lora_weights=lora_server.url("/style.safetensors"), lora_scale=2.5)
    assert error == "lora_scale: 2.5 is greater than the maximum of 2"  # the image's schema answers
    assert cog.is_ready_again()


# --- in-process: a Replicate SDXL training, architectures, the cache ------------------------------


@pytest.fixture(scope="module")
def sdxl(weights_root):
    return load_engine(weights_root, "sdxl-turbo")


@pytest.fixture
def private_urls(monkeypatch, tmp_path):
    monkeypatch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
    monkeypatch.setenv("FASTSD_LORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def sdxl_private(sdxl, private_urls, monkeypatch):
    """The SDXL engine fetching LoRAs by this test's settings (loopback allowed, its own cache)."""
    rules = loras.Rules.from_settings(Settings.from_environment())
    monkeypatch.setattr(sdxl, "served", replace(sdxl.served, lora_rules=rules))
    return sdxl


def generate(engine: Engine, **inputs) -> np.ndarray:
    request = engine.validate(seed=3, **SMALL, **inputs)
    return np.asarray(engine.generate(request).images[0], dtype=int)


def test_a_replicate_training_tar_brings_its_tokens(sdxl_private, weights_root):
    sdxl = sdxl_private
    tar = replicate_training_tar(weights_root / "weights" / variants.VARIANTS["sdxl-turbo"].model)
    with FileServer({"/trained_model.tar": tar}) as server:
        url = server.url("/trained_model.tar")
        original = generate(sdxl, prompt="a photo of TOK")
        with_tokens = generate(sdxl, prompt="a photo of TOK", lora_weights=url)
        request = sdxl.validate(prompt="a photo of TOK on a beach", lora_weights=url)
    adapter = request.loras[0][0].adapter
    assert request.prompt == f"a photo of <{adapter}_s0><{adapter}_s1> on a beach"
    assert differs(with_tokens, original)
    tokenizer = sdxl.pipelines.text_to_image.tokenizer_2
    assert tokenizer.convert_tokens_to_ids(f"<{adapter}_s1>") != tokenizer.unk_token_id
    assert np.array_equal(generate(sdxl, prompt="a photo of TOK"), original)


def test_a_lora_for_another_base_is_refused_before_loading(sdxl_private, lora_server):
    sdxl = sdxl_private
    loaded = sdxl.adapters.loaded
    with pytest.raises(InputError, match="lora_weights is a LoRA for SD 1.5 models; sdxl-turbo is an SDXL model"):
        sdxl.validate(prompt="x", lora_weights=lora_server.url("/style.safetensors"))
    assert sdxl.adapters.loaded == loaded


def test_the_architecture_is_read_from_the_shapes(files):
    for path, expected in (("/style.safetensors", variants.SD15), ("/second.safetensors", variants.SD15),
                           ("/sdxl.safetensors", variants.SDXL)):  # fmt: skip
        data = files[path]
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        assert loras.architecture_of(header) == expected, path


def test_the_cache_keeps_within_its_size(lora_server, private_urls, monkeypatch):
    rules = replace(loras.Rules.from_settings(Settings.from_environment()), cache_bytes=1)  # the newest only
    first = loras.resolve("lora_weights", lora_server.url("/style.safetensors"), rules)
    loras.resolve("lora_weights", lora_server.url("/second.safetensors"), rules)
    assert first.path.exists()  # used in the last ten minutes: kept for the request using it
    os.utime(first.path.parent, (0, 0))  # as if last used long ago
    loras.resolve("lora_weights", lora_server.url("/sdxl.safetensors"), rules)
    assert not first.path.exists()


# --- the URL rules, with FASTSD_ALLOW_PRIVATE_URLS off -------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "192.168.0.10", "169.254.169.254", "100.64.0.1", "::1", "fd00::1",
     "::ffff:127.0.0.1", "64:ff9b::a9fe:a9fe", "0.0.0.0", "224.0.0.1"],
)  # fmt: skip
def test_non_public_addresses_are_refused(address):
    assert not remote.is_public(address)


def test_public_addresses_are_allowed():
    assert remote.is_public("8.8.8.8") and remote.is_public("2606:4700:4700::1111")


def test_loopback_and_http_urls_are_refused_without_the_setting(lora_server, monkeypatch, tmp_path):
    monkeypatch.delenv(remote.ALLOW_PRIVATE_ENV, raising=False)
    before = dict(lora_server.requests)
    https_loopback = lora_server.url("/style.safetensors").replace("http://", "https://")
    with pytest.raises(InputError, match=r"lora_weights: 127\.0\.0\.1 resolves to a non-public address"):
        remote.fetch("lora_weights", https_loopback, tmp_path / "x", 1 << 20)
    with pytest.raises(InputError, match="lora_weights must be an https URL"):
        remote.fetch("lora_weights", lora_server.url("/style.safetensors"), tmp_path / "x", 1 << 20)
    with pytest.raises(InputError, match="resolves to a non-public address"):
        remote.fetch("lora_weights", "https://localhost/x.safetensors", tmp_path / "x", 1 << 20)
    assert lora_server.requests == before  # nothing reached the server
    assert not (tmp_path / "x").exists()


def test_every_redirect_is_checked_again(lora_server, monkeypatch, tmp_path):
    """The first hop is allowed (as a public host would be); its redirect to a private address is not."""
    allowed, first_hop = iter([True]), remote.target  # the first hop only
    monkeypatch.setattr(
        remote, "target", lambda name, url, allow_private=False: first_hop(name, url, next(allowed, False))
    )
    before = lora_server.requests.get("/moved", 0)
    with pytest.raises(InputError, match="lora_weights must be an https URL"):
        remote.fetch("lora_weights", lora_server.url("/moved"), tmp_path / "x", 1 << 20)
    assert lora_server.requests["/moved"] == before + 1
    assert not (tmp_path / "x").exists()


def test_a_compiled_deployment_refuses_loras_before_fetching(sdxl, lora_server, monkeypatch):
    # As FASTSD_COMPILE with FASTSD_LORA_MAX_RANK=0 serves it: no rules for fetching LoRAs.
    compiled = replace(sdxl.pipelines, compile_mode="default", lora_slots=None)
    refusal = lora_refusal_of(compiled, sdxl.family)
    monkeypatch.setattr(sdxl, "served", replace(sdxl.served, lora_rules=None, lora_refusal=refusal))
    before = dict(lora_server.requests)
    with pytest.raises(
        InputError,
        match=r"not served by this deployment: .*FASTSD_COMPILE.*FASTSD_LORA_MAX_RANK=0",
    ):
        sdxl.validate(prompt="x", lora_weights=lora_server.url("/sdxl.safetensors"))
    assert lora_server.requests == before


# --- the URL rules through the server, with FASTSD_ALLOW_PRIVATE_URLS on (tests/test_remote.py: off) ---


def test_a_url_with_a_password_is_refused_and_sent_nowhere(cog, lora_server):
    before = dict(lora_server.requests)
    url = lora_server.url("/style.safetensors").replace("http://", "http://user:secret@")
    error = failure(cog, lora_weights=url)
    assert "lora_weights must be a URL without a user name or password" in error, error
    assert "secret" not in error
    assert lora_server.requests == before


def test_a_failed_connection_reads_the_same_whatever_the_cause(cog, lora_server):
    import socket

    with socket.socket() as bound:  # bound, not listening: connecting is refused
        bound.bind(("127.0.0.1", 0))
        refused = failure(cog, lora_weights=f"http://127.0.0.1:{bound.getsockname()[1]}/x.safetensors")
    tls_to_plain_http = failure(cog, lora_weights=lora_server.url("/style.safetensors").replace("http:", "https:"))
    sentence = "lora_weights could not be fetched from 127.0.0.1: could not connect."
    assert refused.endswith(sentence) and tls_to_plain_http.endswith(sentence), (refused, tls_to_plain_http)


def test_a_users_lora_is_cached_where_git_and_the_image_leave_it_out(lora_server, tmp_path, monkeypatch):
    """The cache sits under weights/ (docs/loras.md): a LoRA tried locally is never committed nor
    baked into the next `cog build`."""
    import subprocess

    from fastsd_testing.helpers import PROJECT_ROOT, dockerignore_excludes

    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(tmp_path))
    monkeypatch.delenv("FASTSD_LORA_CACHE", raising=False)
    monkeypatch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
    loras.resolve(
        "lora_weights", lora_server.url("/style.safetensors"), loras.Rules.from_settings(Settings.from_environment())
    )
    written = [path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(path.startswith("weights/.lora-cache/") for path in written), written
    patterns = [line for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in ("", "#")]
    for path in written:
        assert dockerignore_excludes(patterns, path), path
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=PROJECT_ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"
