"""Per-request LoRAs on a compiled denoiser (FASTSD_COMPILE): swapped into fixed slots, never recompiling.

In process, on sd15-lcm (the LCM-LoRA fused, users' LoRAs on top; the whole UNet compiled) and on
the three transformers (their blocks compiled regionally): the compiled engine's images against an
uncompiled engine's with the same LoRAs, with torch._dynamo set to raise on any recompilation once
the first call has compiled. About four minutes on a 2-core CPU (Inductor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsd import variants
from fastsd.errors import ConfigurationError, InputError
from fastsd.loras import hotswap, remote
from fastsd.settings import Settings
from fastsd_testing.helpers import load_engine
from fastsd_testing.random_models import KOHYA, PEFT
from fastsd_testing.user_loras import FileServer, meta_transformer, write_transformer_lora, write_user_lora

SMALL = dict(prompt="a lighthouse at dusk", seed=5, width=64, height=64, num_inference_steps=2)


@pytest.fixture(scope="module")
def lora_server(weights_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hotswap-loras")
    model = weights_root / "weights" / variants.VARIANTS["sd15-lcm"].model
    files = {
        "/style.safetensors": write_user_lora(
            model, folder / "a.safetensors", 4, KOHYA, text_encoder=True, seed=1, convolutions=False
        ),
        "/second.safetensors": write_user_lora(model, folder / "b.safetensors", 8, PEFT, seed=2),
        "/wide.safetensors": write_user_lora(model, folder / "c.safetensors", 16, PEFT, seed=3),
        "/locon.safetensors": write_user_lora(model, folder / "d.safetensors", 4, KOHYA, seed=4),
    }
    with FileServer({path: file.read_bytes() for path, file in files.items()}) as server:
        yield server


@pytest.fixture(scope="module")
def engines(weights_root, lora_server, tmp_path_factory):
    """(compiled with slots of rank 8, uncompiled), both fetching from the loopback server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
        patch.setenv("FASTSD_LORA_CACHE", str(tmp_path_factory.mktemp("lora-cache")))
        plain = load_engine(weights_root, "sd15-lcm")
        patch.setenv("FASTSD_COMPILE", "default")
        patch.setenv(hotswap.MAX_RANK_ENV, "8")
        compiled = load_engine(weights_root, "sd15-lcm")
        yield compiled, plain


def image(engine, **inputs) -> np.ndarray:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
        request = engine.validate(**SMALL, **inputs)
    return np.asarray(engine.generate(request).images[0], dtype=int)


@pytest.mark.slow
def test_switching_loras_on_a_compiled_unet_never_recompiles_and_matches_the_uncompiled_images(engines, lora_server):
    compiled, plain = engines
    assert compiled.pipelines.lora_slots is not None and compiled.pipelines.lora_slots.rank == 8
    original = image(compiled)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        switch_loras(compiled, plain, lora_server, original)


def switch_loras(compiled, plain, lora_server, original, *more_cases: dict) -> None:
    """Every switch between two LoRAs, scales and none gives the uncompiled engine's image (within
    2 levels), and none again the compiled original exactly."""
    style, second = lora_server.url("/style.safetensors"), lora_server.url("/second.safetensors")
    cases = [
        *more_cases,
        dict(lora_weights=style),
        dict(lora_weights=second, lora_scale=1.5),
        dict(extra_lora=second),
        dict(lora_weights=style, lora_scale=0.5),
        dict(lora_weights=style, extra_lora=second, extra_lora_scale=1.5),
        dict(lora_weights=second),
        {},
    ]
    for inputs in cases:
        expected = image(plain, **inputs)
        got = image(compiled, **inputs)
        assert np.abs(got - expected).max() <= 2, (compiled.variant.name, inputs)
    assert np.abs(image(compiled, lora_weights=style) - original).mean() > 1.0  # the LoRA changes it
    assert np.array_equal(image(compiled), original)  # and the slots empty again give the original
    assert np.array_equal(image(compiled, lora_weights=style, lora_scale=0.0), original)


@pytest.mark.slow  # compiles a UNet: 25 s
def test_a_lora_the_slots_cannot_hold_fails_cleanly_and_the_next_request_is_served(engines, lora_server):
    compiled, plain = engines
    with pytest.raises(InputError, match=r"its rank is 16, and this deployment's LoRA slots hold up to 8"):
        image(compiled, lora_weights=lora_server.url("/wide.safetensors"))
    with pytest.raises(
        InputError, match=r"extra_lora .* trains layers .* not ResNet convolutions.*without FASTSD_COMPILE"
    ):
        image(compiled, extra_lora=lora_server.url("/locon.safetensors"))
    style = lora_server.url("/style.safetensors")
    assert np.abs(image(compiled, lora_weights=style) - image(plain, lora_weights=style)).max() <= 2
    assert np.abs(image(compiled) - image(plain)).max() <= 2


def test_max_rank_zero_refuses_loras_on_a_compiled_deployment(monkeypatch):
    monkeypatch.setenv(hotswap.MAX_RANK_ENV, "0")
    assert Settings.from_environment().lora_max_rank == 0
    monkeypatch.setenv(hotswap.MAX_RANK_ENV, "lots")
    with pytest.raises(ConfigurationError, match="FASTSD_LORA_MAX_RANK must be a whole number from 0 to 1024"):
        Settings.from_environment()


# The transformers (FLUX.1 [schnell], FLUX.2 [klein], Z-Image): regionally compiled, slots on every
# linear layer of their blocks. A layer outside the blocks, per architecture, for the refusal.
TRANSFORMERS = {"flux-schnell": "x_embedder", "flux2-klein": "x_embedder", "z-image-turbo": "cap_embedder.1"}


@pytest.fixture(scope="module", params=sorted(TRANSFORMERS))
def transformer_engines(request, weights_root, tmp_path_factory):
    """(preset, compiled regionally with slots of rank 8, uncompiled, the LoRA server)."""
    from safetensors.torch import load_file, save_file

    name = request.param
    model = weights_root / "weights" / variants.VARIANTS[name].model
    folder = tmp_path_factory.mktemp(f"hotswap-{name}")
    style = write_transformer_lora(model, folder / "style.safetensors")
    files = {
        "/style.safetensors": style.read_bytes(),
        "/second.safetensors": write_transformer_lora(model, folder / "b.safetensors", rank=8, seed=2).read_bytes(),
        "/wide.safetensors": write_transformer_lora(model, folder / "c.safetensors", rank=16, seed=3).read_bytes(),
    }
    if name == "flux-schnell":
        files["/kohya.safetensors"] = write_transformer_lora(model, folder / "k.safetensors", KOHYA).read_bytes()
    outside = load_file(style)  # the style LoRA, and one layer outside the blocks
    layer = TRANSFORMERS[name]
    linear = meta_transformer(model).get_submodule(layer)
    outside[f"transformer.{layer}.lora_A.weight"] = torch.randn(4, linear.in_features)
    outside[f"transformer.{layer}.lora_B.weight"] = torch.randn(linear.out_features, 4)
    save_file(outside, folder / "outside.safetensors")
    files["/outside.safetensors"] = (folder / "outside.safetensors").read_bytes()
    with FileServer(files) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv(remote.ALLOW_PRIVATE_ENV, "1")
        patch.setenv("FASTSD_LORA_CACHE", str(tmp_path_factory.mktemp("lora-cache")))
        plain = load_engine(weights_root, name, compile=None)
        compiled = load_engine(weights_root, name, compile="regional", lora_max_rank=8)
        yield name, compiled, plain, server


@pytest.mark.slow  # compiles each transformer's blocks: 30 to 40 s each
def test_switching_loras_on_a_compiled_transformer_never_recompiles_and_matches_the_uncompiled_images(
    transformer_engines,
):
    name, compiled, plain, server = transformer_engines
    assert compiled.pipelines.lora_slots is not None and compiled.pipelines.lora_slots.prefix == "transformer"
    original = image(compiled)  # compiles
    kohya = [dict(lora_weights=server.url("/kohya.safetensors"))] if name == "flux-schnell" else []
    with torch._dynamo.config.patch(error_on_recompile=True):
        switch_loras(compiled, plain, server, original, *kohya)


@pytest.mark.slow
def test_a_lora_a_transformers_slots_cannot_hold_is_refused_and_the_next_request_is_served(transformer_engines):
    name, compiled, plain, server = transformer_engines
    with pytest.raises(InputError, match=r"its rank is 16, and this deployment's LoRA slots hold up to 8"):
        image(compiled, lora_weights=server.url("/wide.safetensors"))
    layer = TRANSFORMERS[name]
    with pytest.raises(
        InputError,
        match=rf"extra_lora .* trains layers .* \({layer}: the slots hold the linear layers of its transformer blocks",
    ):
        image(compiled, extra_lora=server.url("/outside.safetensors"))
    style = server.url("/style.safetensors")
    assert np.abs(image(compiled, lora_weights=style) - image(plain, lora_weights=style)).max() <= 2, name
    assert np.abs(image(compiled) - image(plain)).max() <= 2, name


def test_a_compiled_transformer_without_slots_refuses_loras_in_one_sentence(weights_root):
    """FASTSD_LORA_MAX_RANK=0: the fastest compiled transformer, and users' LoRAs refused before queueing."""
    engine = load_engine(weights_root, "flux-schnell", compile="regional", lora_max_rank=0)
    assert engine.pipelines.lora_slots is None
    refusal = r"not served by this deployment: it compiles its transformer \(FASTSD_COMPILE\) without LoRA slots"
    with pytest.raises(InputError, match=rf"^lora_weights and extra_lora are {refusal} \(FASTSD_LORA_MAX_RANK=0\)\.$"):
        engine.validate(**SMALL, lora_weights="https://example.com/style.safetensors")
