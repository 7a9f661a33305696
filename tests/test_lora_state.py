"""A failed LoRA request leaves no trace: through the real Cog server on sd15-lcm, sequences of LoRA
requests that succeed and fail, each plain image compared byte for byte (png) with the first one, and
each LoRA's image with its first one. Eagerly (peft adapters) and on a compiled UNet (LoRA slots);
the files come from a loopback server (FASTSD_ALLOW_PRIVATE_URLS=1)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from fastsd import variants
from fastsd_testing.cog_server import decode_output, ready_server
from fastsd_testing.random_models import KOHYA, PEFT
from fastsd_testing.user_loras import FileServer, oversized_lora, pickle_lora, write_user_lora

MAX_MB = 0.5  # the servers' FASTSD_LORA_MAX_MB: the "oversized" file is just past it


def _sdxl_of_unreadable_base(model_folder, path) -> bytes:
    """An SDXL LoRA (text encoders too) without the cross-attention keys its base is read from, as a
    LoRA of self-attention and feed-forward layers is: it is tried, and does not fit an SD 1.5 UNet."""
    from safetensors.torch import load_file, save_file

    write_user_lora(model_folder, path, key_format=KOHYA, text_encoder=True, seed=3, convolutions=False)
    save_file({key: value for key, value in load_file(path).items() if "attn2_to_k" not in key}, path)
    return path.read_bytes()


def _training_with_misfit_tokens(lora: bytes) -> bytes:
    """A Replicate training tar of an SD 1.5 LoRA whose token embeddings are too narrow for its encoder."""
    from safetensors.torch import save

    files = {
        "lora.safetensors": lora,
        "embeddings.pti": save({"text_encoders_0": torch.ones(2, 3)}),
        "special_params.json": json.dumps({"TOK": "<s0><s1>"}).encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lora_server(weights_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-state")
    sd15 = weights_root / "weights" / variants.VARIANTS["sd15-lcm"].model
    sdxl = weights_root / "weights" / variants.VARIANTS["sdxl-turbo"].model

    def lora(name: str, **options) -> bytes:
        return write_user_lora(sd15, folder / name, convolutions=False, **options).read_bytes()

    files = {
        "/a.safetensors": lora("a.safetensors", text_encoder=True, seed=1),
        "/b.safetensors": lora("b.safetensors", key_format=PEFT, seed=2),
        "/c.safetensors": lora("c.safetensors", text_encoder=True, seed=4),
        "/wide.safetensors": lora("wide.safetensors", rank=16, key_format=PEFT, seed=5),
        "/sdxl.safetensors": _sdxl_of_unreadable_base(sdxl, folder / "sdxl.safetensors"),
        "/tokens.tar": _training_with_misfit_tokens(lora("tokens.safetensors", seed=6)),
        "/model.ckpt": pickle_lora(),
        "/big.safetensors": oversized_lora(MAX_MB),
    }
    files["/truncated.safetensors"] = files["/b.safetensors"][:-100]
    with FileServer(files) as server:
        yield server


def _environment(weights_root, lora_server, tmp_path_factory, **extra) -> dict[str, str]:
    return {
        "FASTSD_VARIANT": "sd15-lcm",
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_ALLOW_PRIVATE_URLS": "1",
        "FASTSD_LORA_CACHE": str(tmp_path_factory.mktemp("lora-cache")),
        "FASTSD_LORA_MAX_MB": str(MAX_MB),
        "HF_ENDPOINT": lora_server.root,
        **extra,
    }


class Requests:
    """One server's requests at a fixed seed, each answer's png bytes, and the first answer to each
    distinct set of LoRAs: every later answer to the same set must be the same bytes."""

    def __init__(self, server, lora_server, **size):
        self.server, self.lora_server, self.size = server, lora_server, size
        self.first: dict[tuple, bytes] = {}
        self.log: list[str] = []  # what ran so far, for the failure message

    def _inputs(self, lora_weights=None, extra_lora=None) -> dict:
        inputs = dict(prompt="a lighthouse at dusk", seed=7, output_format="png", **self.size)
        for name, path in (("lora_weights", lora_weights), ("extra_lora", extra_lora)):
            if path is not None:
                inputs[name] = self.lora_server.url(path)
        return inputs

    def succeeds(self, lora_weights=None, extra_lora=None) -> None:
        response = self.server.predict(**self._inputs(lora_weights, extra_lora))
        assert response["status"] == "succeeded", response.get("error")
        served = decode_output(response["output"][0])[0]
        key = (lora_weights, extra_lora)
        self.log.append(f"{key} ok")
        first = self.first.setdefault(key, served)
        assert served == first, f"{key} is not the image it was first; after: {' -> '.join(self.log)}"

    def fails(self, lora_weights=None, extra_lora=None) -> None:
        response = self.server.predict(**self._inputs(lora_weights, extra_lora))
        assert response["status"] == "failed", f"{lora_weights, extra_lora} should fail"
        error = response["error"]
        assert "Traceback" not in error and "\n" not in error.strip(), error
        assert self.server.is_ready_again()
        self.log.append(f"{(lora_weights, extra_lora)} failed: {error[:80]}")


@pytest.fixture(scope="module")
def eager(weights_root, lora_server, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "lora-state.log"
    # Room for two: a failing request after A and B would evict one of them.
    environment = _environment(weights_root, lora_server, tmp_path_factory, FASTSD_LORAS_LOADED="2")
    yield from ready_server(environment, log_path)


# Each way a LoRA request fails, as (lora_weights, extra_lora): A, B and C are SD 1.5 LoRAs that load.
FAILURES = [
    ("/sdxl.safetensors", None),  # another base's LoRA: "does not fit"
    ("/a.safetensors", "/sdxl.safetensors"),  # the same, after A loaded in the same request
    ("/c.safetensors", "/sdxl.safetensors"),  # a new C loaded, then the second fails (and past the loaded limit)
    ("/tokens.tar", None),  # token embeddings that do not fit the text encoder
    ("/model.ckpt", None),  # a pickle
    ("/missing.safetensors", None),  # 404
    ("/big.safetensors", None),  # over FASTSD_LORA_MAX_MB
    (None, "/truncated.safetensors"),
]


def test_a_failed_lora_request_changes_no_later_image(eager, lora_server):
    requests = Requests(eager, lora_server, width=64, height=64, num_inference_steps=2)
    requests.succeeds()
    requests.succeeds("/a.safetensors")
    requests.succeeds("/a.safetensors", "/b.safetensors")
    for failing in FAILURES:
        requests.succeeds("/a.safetensors")
        requests.fails(*failing)
        requests.succeeds()
        requests.succeeds("/a.safetensors", "/b.safetensors")
        requests.fails(*failing)
        requests.succeeds("/a.safetensors")
        requests.fails(*failing)
        requests.succeeds(None, "/b.safetensors")
    requests.succeeds("/c.safetensors")
    requests.succeeds()


@pytest.fixture(scope="module")
def compiled(weights_root, lora_server, tmp_path_factory):
    """FASTSD_COMPILE with LoRA slots of rank 8 (Inductor on the CPU: a minute or two to start)."""
    log_path = tmp_path_factory.mktemp("logs") / "lora-state-compiled.log"
    environment = _environment(
        weights_root, lora_server, tmp_path_factory, FASTSD_COMPILE="default", FASTSD_LORA_MAX_RANK="8"
    )
    yield from ready_server(environment, log_path)


def test_a_failed_lora_request_changes_no_later_image_on_a_compiled_unet(compiled, lora_server):
    # At the size the warm-up compiled: no other shape to compile for.
    requests = Requests(compiled, lora_server, num_inference_steps=1)
    requests.succeeds()
    requests.succeeds("/a.safetensors", "/b.safetensors")
    requests.fails("/wide.safetensors", None)  # rank 16 past the slots' 8
    requests.succeeds()
    requests.succeeds("/a.safetensors")
    requests.fails("/a.safetensors", "/sdxl.safetensors")
    requests.succeeds()
    requests.succeeds("/a.safetensors")
