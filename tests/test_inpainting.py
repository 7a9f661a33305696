"""Inpainting and outpainting, through the real Cog server for a 1-step preset, a 4-step LoRA preset
and an SDXL preset: the pixels the mask keeps come back unchanged, transparency is the area to
fill, bad masks fail with one sentence and the server stays ready."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import images, variants
from fastsd.engine import Engine
from fastsd.gpu import GRAPHS_ENV
from fastsd.settings import Settings
from fastsd.tasks import Task
from fastsd_testing.cog_server import data_uri, output_pixels, ready_server

SIZE = (96, 64)  # width, height: multiples of 8, small for the tiny models


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))


def box_mask(left: int, top: int, right: int, bottom: int, size=SIZE) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


FAR = np.ones((SIZE[1], SIZE[0]), dtype=bool)
FAR[8:48, 16:72] = False  # more than 8 px from the white box below: must come back exactly


# sd-turbo once more with the GPU path's graphs on (on the CPU its eager stand-in): the composite
# is then made on the device tensors, and must keep the same pixels.
@pytest.fixture(scope="module", params=["sd-turbo", "sd15-lcm", "sdxl-turbo", "sd-turbo graphs"])
def server(request, weights_root, tmp_path_factory):
    variant, *graphs = request.param.split()
    log_path = tmp_path_factory.mktemp("logs") / f"inpaint-{request.param.replace(' ', '-')}.log"
    environment = {"FASTSD_VARIANT": variant, "FASTSD_WEIGHTS_ROOT": str(weights_root)}
    if graphs:
        environment[GRAPHS_ENV] = "on"
    yield from ready_server(environment, log_path)


outputs = output_pixels


def test_the_pixels_the_mask_keeps_come_back_unchanged(server):
    original = photo()
    response = server.predict(
        prompt="a red door",
        image=data_uri(png(original)),
        mask=data_uri(png(box_mask(24, 16, 64, 40))),
        seed=3,
        num_outputs=2,
        output_format="png",
    )
    assert "inpainting:" in response["logs"]
    for result in outputs(response):
        assert result.shape == (SIZE[1], SIZE[0], 3)
        assert np.array_equal(result[FAR], np.asarray(original, dtype=int)[FAR])
        assert np.abs(result[20:36, 28:60] - np.asarray(original, dtype=int)[20:36, 28:60]).mean() > 10


def test_a_mask_of_another_size_is_resized_to_the_image(server):
    original = photo(1)
    response = server.predict(
        prompt="a window",
        image=data_uri(png(original)),
        mask=data_uri(png(box_mask(48, 32, 128, 80, size=(192, 128)))),  # the same box, twice the size
        seed=4,
        output_format="png",
    )
    [result] = outputs(response)
    assert np.array_equal(result[FAR], np.asarray(original, dtype=int)[FAR])


def test_transparent_pixels_are_outpainted(server):
    canvas = photo(2).convert("RGBA")
    alpha = np.full((SIZE[1], SIZE[0]), 255, dtype=np.uint8)
    alpha[:, 72:] = 0  # the right quarter is transparent: the area to fill
    canvas.putalpha(Image.fromarray(alpha))
    response = server.predict(prompt="more of the same", image=data_uri(png(canvas)), seed=5, output_format="png")
    [result] = outputs(response)
    kept = np.asarray(canvas.convert("RGB"), dtype=int)
    assert np.array_equal(result[:, :56], kept[:, :56])  # far from the transparent band
    assert np.abs(result[:, 76:] - 255).mean() > 10  # filled in, not left white


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(mask="MASK"), "mask needs an image"),
        (dict(image="IMAGE", mask="BLACK"), "mask is all black: nothing to repaint"),
        (dict(image="IMAGE", mask="JUNK"), "mask is not a readable image file"),
        (dict(image="IMAGE", mask="/etc/passwd"), "mask must be an http(s) URL or a data URI"),
        (dict(image="IMAGE", mask="MASK", strength=0.1, num_inference_steps=2), "at least 1 for inpainting"),
    ],
)
def test_bad_masks_fail_with_one_sentence_and_the_server_stays_ready(server, inputs, message):
    sources = {
        "IMAGE": data_uri(png(photo())),
        "MASK": data_uri(png(box_mask(24, 16, 64, 40))),
        "BLACK": data_uri(png(Image.new("L", SIZE, 0))),
        "JUNK": "data:image/png;base64,bm90IGFuIGltYWdl",
    }
    response = server.predict(prompt="x", **{k: sources.get(v, v) for k, v in inputs.items()})
    assert response["status"] == "failed" and message in response["error"], response.get("error")
    assert server.predict(prompt="after", seed=1, width=64, height=64)["status"] == "succeeded"


# --- in process: the same images as stock diffusers' inpainting pipeline ---------------------------


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-turbo"])
def test_inpainting_draws_what_stock_diffusers_draws(use_weights, name, tmp_path):
    """A white mask repaints everything, so the composite is the generated image itself: it must
    be what AutoPipelineForInpainting draws from the same weights, image, mask and seed."""
    from diffusers import AutoPipelineForInpainting

    photo().save(tmp_path / "image.png")
    Image.new("L", SIZE, 255).save(tmp_path / "mask.png")
    engine = Engine.load(variants.VARIANTS[name], Settings.from_environment(), "cpu", torch.float32)
    request = engine.validate(
        prompt="a lighthouse",
        image=tmp_path / "image.png",
        mask=tmp_path / "mask.png",
        seed=6,
        vae="full",
        output_format="png",
    )
    assert request.task is Task.INPAINTING
    ours = np.asarray(engine.generate(request).images[0], dtype=int)
    stock = AutoPipelineForInpainting.from_pretrained(
        use_weights / "weights" / variants.VARIANTS[name].model, dtype=torch.float32
    )
    stock.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        theirs = stock(
            prompt="a lighthouse",
            image=request.image,
            mask_image=request.mask,
            strength=request.strength,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            width=SIZE[0],
            height=SIZE[1],
            generator=torch.Generator("cpu").manual_seed(6),
        ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 2


def test_the_soft_edge_blends_only_next_to_the_white_area():
    original, generated = Image.new("RGB", SIZE, (0, 0, 0)), Image.new("RGB", SIZE, (255, 255, 255))
    result = np.asarray(images.keep_unmasked(original, generated, box_mask(40, 24, 56, 40)))[..., 0]
    assert (result[24:40, 40:56] == 255).all()  # the white area: generated
    assert 0 < result[32, 38] < 255  # two pixels out: blended
    assert (result[FAR] == 0).all()  # far out: the original
