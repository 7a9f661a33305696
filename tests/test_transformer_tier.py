"""The transformers' opt-in GPU tier, checked on the CPU for what a CPU can show: fp8 weights
(FASTSD_FP8, torchao), the attention kernel (FASTSD_ATTENTION, diffusers' dispatcher) and regional
compilation (FASTSD_COMPILE=regional) give the eager image within the precision they trade, and
each refuses what it cannot serve with one sentence. Their speed is for a GPU run to measure
(scripts/gpu-benchmark transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from fastsd.errors import ConfigurationError, InputError
from fastsd_testing.helpers import load_engine

SMALL = dict(prompt="a red fox in fresh snow", seed=3, width=64, height=64)


def pixels(engine, **inputs) -> np.ndarray:
    result = engine.generate(engine.validate(**{**SMALL, **inputs}))
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def eager(weights_root):
    return load_engine(weights_root, "flux-schnell", safety_checker=False)


def test_fp8_weights_draw_nearly_the_same_image_and_refuse_users_loras(weights_root, eager):
    from torchao.quantization import Float8Tensor

    fp8 = load_engine(weights_root, "flux-schnell", safety_checker=False, fp8=True)
    transformer = fp8.pipelines.text_to_image.transformer
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.weight, Float8Tensor)
    difference = np.abs(pixels(fp8) - pixels(eager))
    assert difference.mean() < 4 and difference.max() < 40  # fp8 keeps 3 mantissa bits: near, not equal
    with pytest.raises(InputError, match=r"weights are fp8 \(FASTSD_FP8\)") as refused:
        fp8.validate(**SMALL, lora_weights="someone/style")
    assert refused.value.field == "lora_weights"


def test_an_attention_backend_gives_the_same_image_and_an_unknown_one_is_one_sentence(weights_root, eager):
    math = load_engine(weights_root, "flux-schnell", safety_checker=False, attention="_native_math")
    assert np.abs(pixels(math) - pixels(eager)).max() <= 1
    with pytest.raises(ConfigurationError, match="FASTSD_ATTENTION='fastest' is not an attention backend"):
        load_engine(weights_root, "flux-schnell", safety_checker=False, attention="fastest")


def test_a_backend_this_machine_cannot_run_stops_setup_with_one_sentence(weights_root):
    with pytest.raises(ConfigurationError, match=r"^FASTSD_ATTENTION=_flash_3 cannot run here: "):
        load_engine(weights_root, "z-image-turbo", safety_checker=False, attention="_flash_3")


def test_the_sd_presets_run_without_the_transformer_tier_and_say_so(weights_root, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        engine = load_engine(weights_root, "sd-turbo", safety_checker=False, fp8=True)
    assert not engine.pipelines.fp8
    assert "FASTSD_ATTENTION and FASTSD_FP8 cover the transformer presets; sd-turbo runs without them" in caplog.text


@pytest.mark.slow  # Inductor compiles the repeated blocks on the CPU: a minute
def test_regional_compilation_compiles_the_repeated_blocks_and_draws_the_eager_image(
    weights_root, eager, monkeypatch, tmp_path
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = load_engine(weights_root, "flux-schnell", safety_checker=False, compile="regional")
    block = compiled.pipelines.text_to_image.transformer.transformer_blocks[0]
    assert getattr(block, "_compiled_call_impl", None) is not None  # Module.compile in place
    assert np.abs(pixels(compiled) - pixels(eager)).max() <= 1
