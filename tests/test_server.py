"""Every variant through the real Cog HTTP server, as a user of the hosted API calls it."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fastsd import variants
from fastsd_testing.cog_server import CogServer, data_uri, decode_output
from fastsd_testing.helpers import png_bytes

SMALL = dict(width=64, height=64)  # the tiny models make any size cheap; keep requests fast


@pytest.fixture(scope="module", params=list(variants.VARIANTS))
def server(request, weights_root, tmp_path_factory):
    name = request.param
    log_path = tmp_path_factory.mktemp("logs") / f"{name}.log"
    cog = CogServer({"FASTSD_VARIANT": name, "FASTSD_WEIGHTS_ROOT": str(weights_root)}, log_path)
    try:
        state = cog.wait_for_setup()
        assert state["status"] == "READY", state
        cog.variant = variants.VARIANTS[name]
        yield cog
    finally:
        cog.stop()


def succeeded(response: dict) -> list[tuple[bytes, Image.Image]]:
    assert response["status"] == "succeeded", response.get("error")
    return [decode_output(uri) for uri in response["output"]]


def test_setup_logs_what_it_loaded(server):
    logs = server.health()["setup"]["logs"]
    assert f"loaded {server.variant.name}" in server.log_path.read_text() + logs


def test_text_to_image_with_defaults_returns_webp_and_records_seed(server):
    response = server.predict(prompt="a lighthouse at dawn", **SMALL)
    [(payload, image)] = succeeded(response)
    assert image.format == "WEBP" and image.size == (64, 64)
    assert isinstance(response["metrics"]["seed"], int)
    assert response["metrics"]["inference_time"] > 0
    assert f"seed {response['metrics']['seed']}" in response["logs"]
    assert f"vae {server.variant.default_vae}" in response["logs"]


def test_default_size_is_the_variants(server):
    if server.variant.width * server.variant.height > 512 * 512:
        pytest.skip("1024x1024 is slow on the CPU even with tiny models")
    [(_, image)] = succeeded(server.predict(prompt="a fox", num_inference_steps=1))
    assert image.size == (server.variant.width, server.variant.height)


def test_image_to_image_keeps_input_size_rounded_to_the_models_multiple(server):
    response = server.predict(prompt="a red barn", image=data_uri(png_bytes(100, 70)), strength=0.5, seed=3)
    [(_, image)] = succeeded(response)
    assert image.size == {8: (104, 72), 16: (96, 64)}[server.variant.size_multiple]


def test_image_to_image_is_fitted_to_width_and_height(server):
    response = server.predict(prompt="a red barn", image=data_uri(png_bytes(100, 70)), width=64, height=96)
    [(_, image)] = succeeded(response)
    assert image.size == (64, 96)


def test_the_tiny_vae_makes_a_different_image_from_the_same_latents(server):
    full = succeeded(server.predict(prompt="a clock tower", seed=5, vae="full", output_format="png", **SMALL))
    tiny = succeeded(server.predict(prompt="a clock tower", seed=5, vae="tiny", output_format="png", **SMALL))
    assert tiny[0][1].size == (64, 64)
    assert "vae tiny" in server.predict(prompt="a clock tower", seed=5, vae="tiny", **SMALL)["logs"]
    assert full[0][0] != tiny[0][0]


def test_several_outputs_come_back_distinct(server):
    outputs = succeeded(server.predict(prompt="three cats", num_outputs=3, seed=11, **SMALL))
    assert len(outputs) == 3
    assert len({payload for payload, _ in outputs}) == 3


@pytest.mark.parametrize("output_format, pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_each_output_format_decodes_at_the_requested_size(server, output_format, pil_format):
    response = server.predict(prompt="a bowl of fruit", output_format=output_format, width=80, height=64, seed=1)
    [(_, image)] = succeeded(response)
    assert (image.format, image.size) == (pil_format, (80, 64))


def test_same_seed_same_bytes_other_seed_other_bytes(server):
    first = succeeded(server.predict(prompt="a glass city", seed=1234, output_format="png", **SMALL))
    again = succeeded(server.predict(prompt="a glass city", seed=1234, output_format="png", **SMALL))
    other = succeeded(server.predict(prompt="a glass city", seed=1235, output_format="png", **SMALL))
    assert first[0][0] == again[0][0]
    assert first[0][0] != other[0][0]


def _bad_inputs(variant: variants.Variant) -> list[tuple[str, dict]]:
    """(the input the error must name, request inputs) for each kind of mistake."""
    huge = io.BytesIO()
    Image.new("1", (9000, 5000)).save(huge, format="PNG")  # 45 megapixels in a few kB
    side = int(variant.max_pixels**0.5) // 8 * 8  # the largest square one image may have
    over_batch_budget = [("num_outputs x width x height", {"num_outputs": 8, "width": side, "height": side})]
    if 8 * side * side <= variant.max_batch_pixels:
        over_batch_budget = []  # this variant allows eight of its largest images
    if 2048 * 2048 > variant.max_pixels:  # the largest sides the schema allows, past the pixel budget
        over_batch_budget.append(("width x height", {"width": 2048, "height": 2048}))
    return over_batch_budget + [
        ("prompt", {}),
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": 42}),
        ("width", {"width": 65}),
        ("width", {"width": 4096}),
        ("height", {"height": "tall"}),
        ("num_outputs", {"num_outputs": 9}),
        ("num_outputs", {"num_outputs": 0}),
        ("strength", {"strength": 1.5}),
        ("guidance_scale", {"guidance_scale": 50}),
        ("guidance_scale", {"guidance_scale": "high"}),
        ("num_inference_steps", {"num_inference_steps": 0}),
        ("num_inference_steps", {"num_inference_steps": 1000}),
        ("num_inference_steps", {"num_inference_steps": 2.5}),
        ("seed", {"seed": -1}),
        ("output_format", {"output_format": "gif"}),
        ("output_quality", {"output_quality": 101}),
        ("vae", {"vae": "medium"}),
        ("image", {"image": data_uri(b"this is not an image", "image/png")}),
        ("image", {"image": data_uri(huge.getvalue())}),
        ("image", {"image": "/etc/hostname"}),  # a path on the server: never read
        ("image", {"image": "file:///etc/hostname"}),
        (
            "strength x num_inference_steps",
            {"image": data_uri(png_bytes(64, 64)), "num_inference_steps": 1, "strength": 0.5},
        ),
        *_refused_by_the_model(variant),
    ]


def _refused_by_the_model(variant: variants.Variant) -> list[tuple[str, dict]]:
    """What a preset cannot honour, refused naming the input (and the preset where it is its own)."""
    refused = []
    if variant.size_multiple != 8:
        refused.append(("multiple of 16", {"width": 72}))
    if not variant.max_references:
        refused.append(("reference_images", {"reference_images": [data_uri(png_bytes(64, 64))]}))
    else:
        refused.append(("at most 4", {"reference_images": [data_uri(png_bytes(64, 64))] * 5}))
    if not variant.controlnet_choices():
        refused.append(
            ("no canny ControlNet is published", {"controlnet": "canny", "control_image": data_uri(png_bytes(64, 64))})
        )
    if variant.recipe.guidance == variants.DISTILLED:
        refused += [
            (f"negative_prompt has no effect on {variant.name}", {"negative_prompt": "blur"}),
            (f"guidance_scale is fixed at {variant.guidance_scale:g} on {variant.name}", {"guidance_scale": 3}),
        ]
    return refused


def test_bad_inputs_fail_clearly_and_the_server_stays_ready(server):
    """Each is refused naming its input: by the input schema, as in the image (422), or by fastsd."""
    for named_input, inputs in _bad_inputs(server.variant):
        inputs = {"prompt": "a tree", **inputs} if "prompt" not in inputs and inputs else inputs
        if inputs.get("prompt") is None:
            inputs.pop("prompt", None)
        error = server.refusal(**inputs)
        assert named_input in error, (named_input, error)
        assert "Traceback" not in error
        assert server.is_ready_again(), server.health()
    succeeded(server.predict(prompt="after all that, a tree", **SMALL))


def test_an_input_the_image_does_not_declare_is_dropped_as_the_image_drops_it(server):
    """coglet strips inputs its schema does not list (a typo such as widht): the request runs with
    the default, as a built image runs it."""
    typo = server.predict(prompt="a tree", widht=72, width=64, height=64, seed=3, output_format="png")
    assert succeeded(typo)[0][1].size == (64, 64)


def test_without_the_schema_fastsd_itself_refuses_what_the_schema_would(weights_root, tmp_path):
    """Outside an image (no schema) every input reaches run(): fastsd's own checks give the sentence."""
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root)}
    cog = CogServer(environment, tmp_path / "server.log", schema=False)
    try:
        assert cog.wait_for_setup()["status"] == "READY"
        for named_input, inputs in [("strength", {"strength": 1.5}), ("output_format", {"output_format": "gif"})]:
            error = cog.refusal(prompt="a tree", **inputs)
            assert error.endswith(".") and named_input in error and "InputError" in error, error
        assert "unexpected keyword argument 'bogus'" in cog.refusal(prompt="a tree", bogus=True)
    finally:
        cog.stop()


def test_missing_weights_fail_setup_naming_the_fetch_command(tmp_path):
    cog = CogServer({"FASTSD_VARIANT": "sdxl-lcm", "FASTSD_WEIGHTS_ROOT": str(tmp_path)}, tmp_path / "server.log")
    try:
        state = cog.wait_for_setup()
        assert state["status"] == "SETUP_FAILED"
        text = state["setup"]["logs"] + cog.log_path.read_text()
        # The command as a person at the project's root runs it: the .venv's python (a bare `python`
        # there has no fastsd), since this server runs from the .venv.
        assert ".venv/bin/python scripts/download_weights.py sdxl-lcm" in text
        assert "lcm-lora-sdxl" in text and "sdxl-vae-fp16-fix" in text
    finally:
        cog.stop()


def test_a_truncated_weight_file_fails_setup_naming_it(weights_root, tmp_path):
    """A hand-placed model (no manifest) with a cut-off file: one clear sentence, not a safetensors traceback."""
    import shutil

    model = tmp_path / "weights" / "stabilityai" / "sd-turbo"
    shutil.copytree(weights_root / "weights" / "stabilityai" / "sd-turbo", model)
    unet = model / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    with open(unet, "r+b") as file:
        file.truncate(1000)
    # No safety checkers copied either: FASTSD_SAFETY_CHECKER=off, so that the UNet is what is missing.
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(tmp_path), "FASTSD_SAFETY_CHECKER": "off"}
    cog = CogServer(environment, tmp_path / "server.log")
    try:
        state = cog.wait_for_setup()
        assert state["status"] == "SETUP_FAILED"
        text = state["setup"]["logs"] + cog.log_path.read_text()
        assert f"{unet} (1000 bytes, truncated inside its" in text
        assert "python scripts/download_weights.py sd-turbo" in text
    finally:
        cog.stop()


def test_an_image_path_on_the_server_is_never_read(server, tmp_path):
    """Only what Cog downloaded (URL, data URI) is an image: a path to a real local image is refused."""
    local = tmp_path / "secret.png"
    local.write_bytes(png_bytes(64, 64))
    response = server.predict(prompt="a tree", image=str(local))
    assert response["status"] == "failed" and "not a file path" in response["error"]
