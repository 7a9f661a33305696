"""Per-request LoRAs on FLUX.2 [klein], Z-Image-Turbo and FLUX.1 [schnell], through the real Cog
server: the formats people publish for each (diffusers/peft; FLUX.1's kohya files and Replicate's
FLUX trainer tar), the image they change and the exact image without them, a LoRA for another
architecture refused naming both, and no state left behind by one that fails; FLUX.1 [schnell]
also compiled (FASTSD_COMPILE=regional), its LoRAs in slots (tests/test_hotswap.py in process)."""

from __future__ import annotations

import numpy as np
import pytest

from fastsd import variants
from fastsd.loras import references
from fastsd_testing.cog_server import CogServer, decode_output
from fastsd_testing.user_loras import KOHYA, FileServer, flux_training_tar, write_transformer_lora

SMALL = dict(width=64, height=64, seed=7)
PRESETS = ("flux2-klein", "z-image-turbo", "flux-schnell")


def folder(weights_root, name: str):
    return weights_root / "weights" / variants.VARIANTS[name].model


@pytest.fixture(scope="module")
def files(weights_root, tmp_path_factory):
    made = tmp_path_factory.mktemp("transformer-loras")
    served = {}
    for name in PRESETS:
        path = write_transformer_lora(folder(weights_root, name), made / f"{name}.safetensors")
        served[f"/{name}.safetensors"] = path.read_bytes()
        second = write_transformer_lora(folder(weights_root, name), made / f"{name}-2.safetensors", seed=2)
        served[f"/{name}-2.safetensors"] = second.read_bytes()
    kohya = write_transformer_lora(folder(weights_root, "flux-schnell"), made / "kohya.safetensors", KOHYA)
    served["/flux-kohya.safetensors"] = kohya.read_bytes()
    served["/flux-training.tar"] = flux_training_tar(folder(weights_root, "flux-schnell"))
    served["/truncated.safetensors"] = served["/flux-schnell.safetensors"][:-64]
    return served


@pytest.fixture(scope="module")
def lora_server(files):
    with FileServer(files) as server:
        yield server


# Each preset eager, and FLUX.1 [schnell] compiled (its LoRAs hot-swapped into the blocks' slots).
SERVERS = [(name, None) for name in PRESETS] + [("flux-schnell", "regional")]


@pytest.fixture(scope="module", params=SERVERS, ids=[f"{name}-{mode or 'eager'}" for name, mode in SERVERS])
def cog(request, weights_root, lora_server, tmp_path_factory):
    name, compile_mode = request.param
    log_path = tmp_path_factory.mktemp("logs") / f"loras-{name}-{compile_mode or 'eager'}.log"
    environment = {
        **({"FASTSD_COMPILE": compile_mode} if compile_mode else {}),
        "FASTSD_VARIANT": name,
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_ALLOW_PRIVATE_URLS": "1",
        "FASTSD_LORA_CACHE": str(tmp_path_factory.mktemp("lora-cache")),
        "FASTSD_LORAS_LOADED": "2",
    }
    server = CogServer(environment, log_path)
    try:
        assert server.wait_for_setup()["status"] == "READY", log_path.read_text()[-3000:]
        if compile_mode:
            assert "LoRA slots of rank 64 in the transformer" in log_path.read_text()
        server.variant = variants.VARIANTS[name]
        yield server
    finally:
        server.stop()


def image(cog: CogServer, **inputs) -> np.ndarray:
    response = cog.predict(**{"prompt": "a lighthouse at dusk", **SMALL, **inputs})
    assert response["status"] == "succeeded", response.get("error")
    return np.asarray(decode_output(response["output"][0])[1].convert("RGB"), dtype=int)


def refusal(cog: CogServer, **inputs) -> str:
    response = cog.predict(prompt="a lighthouse at dusk", **SMALL, **inputs)
    assert response["status"] == "failed", "expected the prediction to fail"
    assert cog.is_ready_again()
    return response["error"]


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a - b).mean() > 1.0


def test_a_lora_changes_the_image_and_without_it_the_image_is_the_original(cog, lora_server):
    name = cog.variant.name
    original = image(cog)
    styled = image(cog, lora_weights=lora_server.url(f"/{name}.safetensors"))
    assert differs(styled, original)
    assert np.array_equal(image(cog), original)
    both = image(cog, lora_weights=lora_server.url(f"/{name}.safetensors"),
                 extra_lora=lora_server.url(f"/{name}-2.safetensors"), extra_lora_scale=0.8)  # fmt: skip
    assert differs(both, styled)
    assert np.array_equal(image(cog, lora_weights=lora_server.url(f"/{name}.safetensors")), styled)


def test_a_lora_for_another_architecture_is_refused_naming_both_and_changes_nothing(cog, lora_server):
    original = image(cog)
    other = next(name for name in PRESETS if name != cog.variant.name)
    error = refusal(cog, lora_weights=lora_server.url(f"/{other}.safetensors"))
    mine, theirs = (variants.ARCHITECTURE_NAMES[variants.VARIANTS[n].architecture] for n in (cog.variant.name, other))
    assert f"lora_weights is a LoRA for {theirs} models; {cog.variant.name} is a {mine} model." in error, error
    assert np.array_equal(image(cog), original)


def test_a_failed_lora_leaves_the_next_request_exactly_as_before(cog, lora_server):
    original = image(cog)
    styled = image(cog, lora_weights=lora_server.url(f"/{cog.variant.name}.safetensors"))
    error = refusal(cog, lora_weights=lora_server.url(f"/{cog.variant.name}.safetensors"),
                    extra_lora=lora_server.url("/truncated.safetensors"))  # fmt: skip
    assert "extra_lora is not a complete safetensors file" in error, error
    assert np.array_equal(image(cog), original)
    assert np.array_equal(image(cog, lora_weights=lora_server.url(f"/{cog.variant.name}.safetensors")), styled)


@pytest.mark.parametrize("path", ["/flux-kohya.safetensors", "/flux-training.tar"])
def test_flux_loras_load_as_civitai_and_replicates_trainer_publish_them(cog, lora_server, path):
    if cog.variant.name != "flux-schnell":
        pytest.skip("FLUX.1's formats")
    assert differs(image(cog, lora_weights=lora_server.url(path)), image(cog))


def test_the_transformers_loras_are_told_apart_by_their_layers(weights_root, tmp_path):
    for name in PRESETS:
        path = write_transformer_lora(folder(weights_root, name), tmp_path / f"{name}.safetensors")
        header = references.check_safetensors("lora_weights", path)
        assert references.architecture_of(header) == variants.VARIANTS[name].architecture, name
    kohya = write_transformer_lora(folder(weights_root, "flux-schnell"), tmp_path / "kohya.safetensors", KOHYA)
    assert references.architecture_of(references.check_safetensors("x", kohya)) == variants.FLUX1


@pytest.mark.parametrize(
    ("widths", "architecture"),
    [((3072, 21504), variants.FLUX1), ((3072, 27648), variants.FLUX2_KLEIN), ((4096, 36864), variants.FLUX2_KLEIN)],
)
def test_bfl_named_flux_loras_are_told_apart_by_the_single_blocks_projection(widths, architecture):
    """FLUX.1 and FLUX.2 share BFL's layer names; their single blocks' first projection differs
    (attention and a 4x MLP: 7 widths; attention and a 3x SwiGLU: 9). Header shapes only."""
    inputs, outputs = widths
    header = {
        "diffusion_model.single_blocks.0.linear1.lora_A.weight": {"shape": [16, inputs]},
        "diffusion_model.single_blocks.0.linear1.lora_B.weight": {"shape": [outputs, 16]},
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": {"shape": [16, inputs]},
    }
    assert references.architecture_of(header) == architecture


def test_an_sd_lora_is_never_taken_for_a_transformers():
    header = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight": {"shape": [4, 9]}}
    assert references.architecture_of(header) is None
