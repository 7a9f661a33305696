"""The 2024 recipes (SDXL-Lightning, Hyper-SD, TCD, DMD2): each preset through the real Cog server
draws what its model card's diffusers code draws on the same weights, and any fine-tune takes
any acceleration made for its architecture."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from model_cards import CARDS

from fastsd import variants
from fastsd.engine import Engine
from fastsd.errors import ConfigurationError
from fastsd.settings import Settings
from fastsd_testing.cog_server import CogServer, data_uri, decode_output

SMALL = dict(width=64, height=64)


@pytest.fixture(scope="module", params=sorted(CARDS))
def preset(request, weights_root, tmp_path_factory):
    """A preset's Cog server in full precision (the model cards' reference runs in float32)."""
    name = request.param
    log_path = tmp_path_factory.mktemp("logs") / f"{name}.log"
    server = CogServer(
        {"FASTSD_VARIANT": name, "FASTSD_WEIGHTS_ROOT": str(weights_root), "FASTSD_DTYPE": "float32"}, log_path
    )
    try:
        assert server.wait_for_setup()["status"] == "READY", log_path.read_text()[-3000:]
        yield name, server
    finally:
        server.stop()


def served(server, **inputs) -> np.ndarray:
    response = server.predict(prompt="a lighthouse in a storm", seed=7, output_format="png", vae="full", **inputs)
    assert response["status"] == "succeeded", response.get("error")
    [(_, image)] = [decode_output(uri) for uri in response["output"]]
    return np.asarray(image.convert("RGB"), dtype=int)


def card(name: str, weights_root, **call) -> np.ndarray:
    pipe, recipe = CARDS[name](weights_root)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(
            prompt="a lighthouse in a storm", generator=torch.Generator("cpu").manual_seed(7), **{**recipe, **call}
        ).images[0]
    return np.asarray(image, dtype=int)


def test_setup_names_the_recipe_and_its_scheduler(preset):
    name, server = preset
    recipe = variants.VARIANTS[name].recipe
    logged = server.log_path.read_text()
    assert f"loaded {name}" in logged and f"recipe {recipe.name}" in logged
    assert f"scheduler {recipe.scheduler.name}" in logged


def test_text_to_image_is_what_the_model_card_draws(preset, weights_root):
    name, server = preset
    ours = served(server, **SMALL)
    theirs = card(name, weights_root, **SMALL)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 2


def test_image_to_image_is_what_the_model_card_pipeline_draws_from_the_image(preset, weights_root, tmp_path):
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    name, server = preset
    start = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    start.save(tmp_path / "start.png")
    # A recipe trained at fixed timesteps (DMD2) keeps them and strength picks the last ones;
    # the others raise the step count so that their own count still runs (README: Inputs).
    steps = variants.VARIANTS[name].num_inference_steps
    fixed = variants.VARIANTS[name].recipe.scheduler.timesteps
    ours = served(server, image=data_uri((tmp_path / "start.png").read_bytes()), strength=0.5)
    pipe, recipe = CARDS[name](weights_root)
    image_to_image = AutoPipelineForImage2Image.from_pipe(pipe)
    image_to_image.set_progress_bar_config(disable=True)
    call = {**recipe, "strength": 0.5}
    if not fixed:
        call["num_inference_steps"] = int(np.ceil(steps / 0.5))
    with torch.inference_mode():
        theirs = image_to_image(
            prompt="a lighthouse in a storm", image=start, generator=torch.Generator("cpu").manual_seed(7), **call
        ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 2


# --- in process: the sampler, the accelerations of any fine-tune ----------------------------------


def unet_timesteps(engine: Engine, **raw) -> list[int]:
    seen = []
    handle = engine.pipelines.text_to_image.unet.register_forward_pre_hook(
        lambda module, args: seen.append(int(args[1]))
    )
    try:
        engine.generate(engine.validate(prompt="a fox", seed=1, **SMALL, **raw))
    finally:
        handle.remove()
    return seen


def test_dmd2_runs_the_timesteps_it_was_trained_on(use_weights):
    engine = Engine.load(variants.VARIANTS["dmd2-sdxl"], Settings.from_environment(), "cpu", torch.float32)
    assert unet_timesteps(engine) == [999, 749, 499, 249]
    # Another step count gets the LCM scheduler's own spacing, not a truncated copy of these.
    assert unet_timesteps(engine, num_inference_steps=2) == [999, 499]


def test_tcd_recipes_pass_their_eta_and_turbo_its_trailing_timesteps(use_weights, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fastsd"):
        engine = Engine.load(variants.VARIANTS["tcd-sd15"], Settings.from_environment(), "cpu", torch.float32)
        engine.generate(engine.validate(prompt="a fox", seed=1, **SMALL))
    assert "eta 0.3" in caplog.text
    lightning = Engine.load(variants.VARIANTS["sdxl-lightning"], Settings.from_environment(), "cpu", torch.float32)
    assert unet_timesteps(lightning) == [999, 749, 499, 249]  # Euler, trailing spacing, 4 steps


@pytest.fixture
def fine_tunes(weights_root, tmp_path, monkeypatch):
    """Local copies of the SD1.5 and SDXL bases standing in for fine-tunes, and of sd-turbo (SD 2.x)."""
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    copies = {}
    for architecture, hub_id in (
        (variants.SD15, variants.SD15_BASE),
        (variants.SDXL, variants.SDXL_BASE),
        (variants.SD2, "stabilityai/sd-turbo"),
    ):
        copies[architecture] = tmp_path / f"my-{architecture}-fine-tune"
        shutil.copytree(weights_root / "weights" / hub_id, copies[architecture])
    return copies


@pytest.mark.parametrize(
    "architecture, acceleration, scheduler",
    [
        (variants.SD15, "hyper", "TCDScheduler"),
        (variants.SD15, "tcd", "TCDScheduler"),
        (variants.SDXL, "lightning", "EulerDiscreteScheduler"),
        (variants.SDXL, "dmd2", "LCMScheduler"),
        (variants.SDXL, "hyper", "TCDScheduler"),
    ],
)
def test_a_fine_tune_runs_with_any_acceleration_made_for_its_architecture(
    fine_tunes, monkeypatch, architecture, acceleration, scheduler
):
    monkeypatch.setenv("FASTSD_MODEL", str(fine_tunes[architecture]))
    monkeypatch.setenv("FASTSD_ACCELERATION", acceleration)
    engine = Engine.from_settings(Settings.from_environment())
    assert engine.variant.recipe is variants.ACCELERATIONS[acceleration][architecture]
    assert type(engine.pipelines.text_to_image.scheduler).__name__ == scheduler
    result = engine.generate(engine.validate(prompt="a fox", seed=1, **SMALL))
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize(
    "architecture, acceleration, allowed",
    [
        (variants.SD15, "lightning", "none, lcm-lora, hyper, tcd"),
        (variants.SD15, "dmd2", "none, lcm-lora, hyper, tcd"),
        (variants.SD2, "tcd", "none"),
    ],
)
def test_an_acceleration_that_does_not_exist_for_the_architecture_names_those_that_do(
    fine_tunes, monkeypatch, architecture, acceleration, allowed
):
    monkeypatch.setenv("FASTSD_MODEL", str(fine_tunes[architecture]))
    monkeypatch.setenv("FASTSD_ACCELERATION", acceleration)
    with pytest.raises(ConfigurationError, match=f"for it choose one of: {allowed}\\.$"):
        Engine.from_settings(Settings.from_environment())


def test_a_lora_made_for_another_architecture_is_a_setup_error_not_a_silent_no_op(use_weights):
    wrong = dataclasses.replace(variants.VARIANTS["hyper-sdxl"], recipe=variants.ACCELERATIONS["hyper"][variants.SD15])
    with pytest.raises(ConfigurationError, match=r"Hyper-SD15-1step-lora.safetensors is not a LoRA for .*an SDXL"):
        Engine.load(wrong, Settings.from_environment(), "cpu", torch.float32)
