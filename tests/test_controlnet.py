"""ControlNet through the real Cog server, for a 1-step preset (SD 2.1), a 4-step LoRA preset
(SD1.5) and an SDXL preset, each serving canny and depth: with text-to-image and image-to-image,
the same images as stock diffusers' ControlNet pipelines, and bad inputs refused cleanly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import images, variants
from fastsd.engine import Engine
from fastsd.settings import Settings
from fastsd_testing.cog_server import CogServer, data_uri, output_pixels, ready_server

SIZE = (96, 64)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drawing() -> Image.Image:
    """Shapes on white: edges for canny to find."""
    canvas = np.full((SIZE[1], SIZE[0], 3), 255, dtype=np.uint8)
    canvas[12:40, 16:48] = (20, 40, 200)
    canvas[30:56, 56:88] = (200, 30, 30)
    return Image.fromarray(canvas)


def depth_map() -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, SIZE[0], dtype=np.uint8), (SIZE[1], 1))).convert("RGB")


@pytest.fixture(scope="module", params=["sd-turbo", "sd15-lcm", "sdxl-turbo"])
def server(request, weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / f"controlnet-{request.param}.log"
    environment = {
        "FASTSD_VARIANT": request.param,
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_CONTROLNETS": "canny,depth",
    }
    yield from ready_server(environment, log_path)


outputs = output_pixels


def test_setup_loads_the_controlnets_asked_for(server):
    logged = server.log_path.read_text()
    assert "ControlNet canny" in logged and "ControlNet depth" in logged


@pytest.mark.parametrize("controlnet, control", [("canny", drawing), ("depth", depth_map)])
def test_text_to_image_follows_the_control_image_at_its_size(server, controlnet, control):
    response = server.predict(
        prompt="a house", control_image=data_uri(png(control())), controlnet=controlnet, seed=2, output_format="png"
    )
    [result] = outputs(response)
    assert result.shape == (SIZE[1], SIZE[0], 3)  # no width or height: the control image's size
    assert f"controlnet {controlnet}" in response["logs"]
    plain = outputs(server.predict(prompt="a house", seed=2, width=SIZE[0], height=SIZE[1], output_format="png"))
    assert np.abs(result - plain[0]).max() > 2  # the ControlNet changed the picture


def test_image_to_image_with_a_controlnet(server):
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    response = server.predict(
        prompt="a house",
        image=data_uri(png(start)),
        control_image=data_uri(png(drawing())),
        controlnet="canny",
        controlnet_conditioning_scale=0.7,
        strength=0.6,
        seed=3,
        num_outputs=2,
    )
    assert [r.shape for r in outputs(response)] == [(SIZE[1], SIZE[0], 3)] * 2
    assert "image-to-image" in response["logs"] and "controlnet canny at 0.7" in response["logs"]


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(controlnet="canny"), "controlnet canny needs a control_image"),
        (dict(control_image="DRAWING"), "control_image needs controlnet: one of canny, depth"),
        (dict(control_image="DRAWING", controlnet="scribble"), 'controlnet: "scribble" is not one of'),  # schema
        (dict(control_image="JUNK", controlnet="depth"), "control_image is not a readable image file"),
        (dict(control_image="/etc/hosts", controlnet="depth"), "control_image must be an http(s) URL or a data URI"),
        (
            dict(control_image="DRAWING", controlnet="canny", controlnet_conditioning_scale=3),
            "controlnet_conditioning_scale: 3 is greater than the maximum of 2",  # the image's schema
        ),
        (dict(control_image="DRAWING", controlnet="canny", image="DRAWING", mask="DRAWING"), "does not combine"),
    ],
)
def test_bad_control_inputs_fail_with_one_sentence_and_the_server_stays_ready(server, inputs, message):
    sources = {"DRAWING": data_uri(png(drawing())), "JUNK": "data:image/png;base64,bm90IGFuIGltYWdl"}
    # Refused by fastsd (a sentence) or, for a value outside predict.py's choices and bounds, by the
    # image's input schema (422, naming the input).
    error = server.refusal(prompt="x", **{k: sources.get(v, v) for k, v in inputs.items()})
    assert message in error, error
    assert server.predict(prompt="after", seed=1, width=64, height=64)["status"] == "succeeded"


def test_a_controlnet_the_deployment_does_not_serve_is_named_with_the_variable(weights_root, tmp_path):
    environment = {
        "FASTSD_VARIANT": "sd-turbo",
        "FASTSD_WEIGHTS_ROOT": str(weights_root),
        "FASTSD_CONTROLNETS": "canny",
    }
    cog = CogServer(environment, tmp_path / "canny-only.log")
    try:
        assert cog.wait_for_setup()["status"] == "READY"
        response = cog.predict(prompt="x", control_image=data_uri(png(depth_map())), controlnet="depth")
        assert response["status"] == "failed"
        assert "controlnet depth is not served by this deployment (it serves: canny)" in response["error"]
        assert "FASTSD_CONTROLNETS=canny,depth" in response["error"]
    finally:
        cog.stop()


# --- in process: the same images as stock diffusers' ControlNet pipelines ----------------------


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-turbo"])
def test_controlnet_draws_what_stock_diffusers_draws(use_weights, name, tmp_path):
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    drawing().save(tmp_path / "drawing.png")
    variant = variants.VARIANTS[name].with_controlnets(("canny",))
    engine = Engine.load(variant, Settings.from_environment(), "cpu", torch.float32)
    request = engine.validate(
        prompt="a house", control_image=tmp_path / "drawing.png", controlnet="canny", seed=4, vae="full"
    )
    ours = np.asarray(engine.generate(request).images[0], dtype=int)
    controlnet = ControlNetModel.from_pretrained(use_weights / "weights" / variant.controlnet_repo("canny"))
    stock = AutoPipelineForText2Image.from_pretrained(
        use_weights / "weights" / variant.model, controlnet=controlnet, dtype=torch.float32
    )
    stock.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = stock(
            prompt="a house",
            image=images.canny_edges(drawing()),
            controlnet_conditioning_scale=variants.CONDITIONING_SCALE[variant.architecture],
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=SIZE[0],
            height=SIZE[1],
            generator=torch.Generator("cpu").manual_seed(4),
        ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 2


def test_canny_finds_the_edges_and_keeps_the_size():
    edges = np.asarray(images.canny_edges(drawing()))[..., 0]
    assert edges.shape == (SIZE[1], SIZE[0]) and set(np.unique(edges)) == {0, 255}
    assert edges[12:40, 16].max() == 255 and edges[0:10, 0:10].max() == 0  # on the shape's border, not in the blank
