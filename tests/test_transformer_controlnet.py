"""ControlNet for the transformer presets, through the real Cog server: FLUX.1 [schnell] with the
FLUX.1 union ControlNet (one model serving canny and depth, loaded once) for text-to-image and
image-to-image, Z-Image-Turbo with VideoX-Fun's union ControlNet (one checkpoint, diffusers'
single-file loader) for text-to-image; each draws what stock diffusers' ControlNet pipeline draws,
and what is not published (klein's, Z-Image's image-to-image) is refused with one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import SIZE, depth_map, drawing, png  # 96x64: multiples of 16, as the transformers take

from fastsd import images, variants
from fastsd.engine import Engine
from fastsd.errors import ConfigurationError, InputError
from fastsd.families.flux import CONTROLNET_GUIDANCE
from fastsd.tasks import Task
from fastsd.weights.layout import model_folder
from fastsd_testing.cog_server import data_uri, output_pixels, ready_server
from fastsd_testing.helpers import load_engine, settings_for


@pytest.fixture(scope="module", params=["flux-schnell", "z-image-turbo"])
def preset(request) -> variants.Variant:
    return variants.VARIANTS[request.param]


@pytest.fixture(scope="module")
def server(preset, weights_root, tmp_path_factory):
    environment = {
        "FASTSD_VARIANT": preset.name,
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_CONTROLNETS": "canny,depth",
        "FASTSD_SAFETY_CHECKER": "off",
    }
    yield from ready_server(environment, tmp_path_factory.mktemp("logs") / f"controlnet-{preset.name}.log")


@pytest.mark.parametrize("controlnet, control", [("canny", drawing), ("depth", depth_map)])
def test_text_to_image_follows_the_control_image(server, preset, controlnet, control):
    response = server.predict(
        prompt="a house", control_image=data_uri(png(control())), controlnet=controlnet, seed=2, output_format="png"
    )
    [result] = output_pixels(response)
    assert result.shape == (SIZE[1], SIZE[0], 3)  # no width or height: the control image's size
    scale = variants.CONDITIONING_SCALE[preset.architecture]
    assert f"controlnet {controlnet} at {scale:g}" in response["logs"]
    plain = server.predict(prompt="a house", seed=2, width=SIZE[0], height=SIZE[1], output_format="png")
    assert np.abs(result - output_pixels(plain)[0]).max() > 2  # the ControlNet changed the picture


def test_image_to_image_with_a_controlnet_and_a_batch_or_one_sentence_where_none_is_published(server, preset):
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    control = data_uri(png(drawing()))
    inputs = dict(prompt="a house", image=data_uri(png(start)), control_image=control, controlnet="canny",
                  controlnet_conditioning_scale=0.5, strength=0.6, seed=3, num_outputs=2)  # fmt: skip
    if preset.architecture not in variants.CONTROLNET_IMAGE_TO_IMAGE:
        error = server.refusal(**inputs)
        assert error.endswith(
            "controlnet with image (image-to-image) is not available for z-image-turbo: diffusers runs Z-Image "
            "ControlNets with text-to-image only; send control_image without image."
        ), error
        return
    response = server.predict(**inputs)
    assert [r.shape for r in output_pixels(response)] == [(SIZE[1], SIZE[0], 3)] * 2
    assert "image-to-image" in response["logs"] and "controlnet canny at 0.5" in response["logs"]


def test_inpainting_with_a_controlnet_is_one_sentence_and_the_server_stays_ready(server):
    sources = data_uri(png(drawing()))
    error = server.refusal(prompt="x", control_image=sources, controlnet="canny", image=sources, mask=sources)
    assert "does not combine" in error or "image-to-image) is not available" in error, error
    assert server.predict(prompt="after", seed=1, width=64, height=64)["status"] == "succeeded"


# --- in process -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schnell(weights_root):
    variant = variants.VARIANTS["flux-schnell"].with_controlnets(("canny", "depth"))
    return Engine.load(variant, settings_for(weights_root, safety_checker=False), "cpu", torch.float32)


def test_the_union_controlnet_is_loaded_once_for_both_names(schnell):
    canny = schnell.pipelines.get(Task.TEXT_TO_IMAGE, variants.FULL_VAE, "canny")
    depth = schnell.pipelines.get(Task.IMAGE_TO_IMAGE, variants.TINY_VAE, "depth")
    assert type(canny).__name__ == "FluxControlNetPipeline"
    assert type(depth).__name__ == "FluxControlNetImg2ImgPipeline"
    assert canny.controlnet is depth.controlnet and canny.transformer is schnell.pipelines.text_to_image.transformer


def test_the_controlnet_reads_dev_guidance_where_schnell_takes_none(schnell):
    """Too small an effect on the tiny models for the image comparison to see: checked on the call."""
    request = schnell.validate(prompt="a house", control_image=png(drawing()), controlnet="depth", seed=1)
    pipeline = schnell.pipelines.get(Task.TEXT_TO_IMAGE, request.vae, "depth")
    called = schnell.family.task_arguments([request], pipeline, set(), [])
    assert called["guidance_scale"] == CONTROLNET_GUIDANCE and len(called["control_image"]) == 1
    assert called["controlnet_conditioning_scale"] == variants.CONDITIONING_SCALE[variants.FLUX1]


def test_flux_controlnet_draws_what_stock_diffusers_draws(schnell, weights_root, tmp_path):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    drawing().save(tmp_path / "drawing.png")
    request = schnell.validate(
        prompt="a house", control_image=tmp_path / "drawing.png", controlnet="canny", seed=4, vae="full"
    )
    ours = np.asarray(schnell.generate(request).images[0], dtype=int)
    folder = weights_root / "weights" / variants.FLUX1_UNION_CONTROLNET
    stock = FluxControlNetPipeline.from_pretrained(
        model_folder(weights_root, variants.VARIANTS["flux-schnell"].model),
        controlnet=FluxControlNetModel.from_pretrained(folder, dtype=torch.float32),
        dtype=torch.float32,
    )
    stock.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = stock(
            prompt="a house",
            control_image=images.canny_edges(drawing()),
            controlnet_conditioning_scale=variants.CONDITIONING_SCALE[variants.FLUX1],
            num_inference_steps=request.num_inference_steps,
            guidance_scale=CONTROLNET_GUIDANCE,  # the ControlNet reads it; [schnell]'s transformer takes none
            max_sequence_length=variants.VARIANTS["flux-schnell"].recipe.max_sequence_length,
            width=SIZE[0],
            height=SIZE[1],
            generator=torch.Generator("cpu").manual_seed(4),
        ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 1


def test_zimage_controlnet_draws_what_stock_diffusers_draws(weights_root, tmp_path):
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    variant = variants.VARIANTS["z-image-turbo"].with_controlnets(("depth",))
    engine = Engine.load(variant, settings_for(weights_root, safety_checker=False), "cpu", torch.float32)
    depth_map().save(tmp_path / "depth.png")
    request = engine.validate(prompt="a house", control_image=tmp_path / "depth.png", controlnet="depth", seed=4,
                              vae="full")  # fmt: skip
    ours = np.asarray(engine.generate(request).images[0], dtype=int)
    single = variants.SINGLE_FILE_CONTROLNETS[variants.ZIMAGE_UNION_CONTROLNET]
    controlnet = ZImageControlNetModel.from_single_file(
        str(weights_root / "weights" / variants.ZIMAGE_UNION_CONTROLNET / single.filename),
        config=str(weights_root / "weights" / single.config_repo), local_files_only=True, dtype=torch.float32,
    )  # fmt: skip
    stock = ZImageControlNetPipeline.from_pretrained(
        model_folder(weights_root, variant.model), controlnet=controlnet, dtype=torch.float32
    )
    stock.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = stock(
            prompt="a house", control_image=depth_map(), num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, controlnet_conditioning_scale=0.75, width=SIZE[0], height=SIZE[1],
            generator=torch.Generator("cpu").manual_seed(4),
        ).images[0]  # fmt: skip
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 1
    assert engine.pipelines.controlnets == ("depth",)
    assert (
        type(engine.pipelines.get(Task.TEXT_TO_IMAGE, variants.FULL_VAE, "depth")).__name__
        == "ZImageControlNetPipeline"
    )
    assert (Task.IMAGE_TO_IMAGE, variants.FULL_VAE, "depth") not in engine.pipelines.by_key


def test_klein_refuses_a_controlnet_in_one_sentence(weights_root):
    name = "flux2-klein"
    engine = load_engine(weights_root, name, safety_checker=False)
    sentence = f"controlnet canny is not available for {name}: no canny ControlNet"
    with pytest.raises(InputError, match=sentence) as refused:
        engine.validate(prompt="x", control_image=png(drawing()), controlnet="canny")
    assert refused.value.field == "controlnet"
    with pytest.raises(ConfigurationError, match="no depth ControlNet is published"):
        variants.VARIANTS[name].with_controlnets(("depth",))
