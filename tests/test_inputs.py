"""The validation path every caller shares: defaults, sizes, image-to-image rules, clear errors."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fastsd import images, inputs, variants
from fastsd.errors import InputError
from fastsd.inputs import INPUTS, Served
from fastsd_testing.cog_schema import read_inputs
from fastsd_testing.helpers import PROJECT_ROOT, png_bytes

TURBO = variants.VARIANTS["sd-turbo"]
SDXL_LCM = variants.VARIANTS["sdxl-lcm"]


def validate(variant: variants.Variant, **raw) -> inputs.GenerationRequest:
    """The validation path with a deployment serving the variant and everything it may load."""
    return inputs.validate(Served(variant), **raw)


@pytest.fixture
def input_image(tmp_path):
    def make(width, height, **kwargs):
        path = tmp_path / f"in-{width}x{height}.png"
        path.write_bytes(png_bytes(width, height, **kwargs))
        return path

    return make


def test_omitted_inputs_take_the_variants_defaults():
    request = validate(SDXL_LCM, prompt="a boat")
    assert (request.num_inference_steps, request.guidance_scale, request.width, request.height) == (4, 1.0, 1024, 1024)
    assert (request.num_outputs, request.output_format, request.output_quality) == (1, "webp", 80)
    assert 0 <= request.seed <= 2**32 - 1
    assert not request.uses_guidance


def test_the_turbo_variants_default_to_the_tiny_vae_and_the_others_to_the_full_one():
    assert validate(TURBO, prompt="x").vae == "tiny"
    assert validate(variants.VARIANTS["sdxl-turbo"], prompt="x").vae == "tiny"
    assert validate(SDXL_LCM, prompt="x").vae == "full"
    assert validate(TURBO, prompt="x", vae="full").vae == "full"
    with pytest.raises(InputError, match="vae must be one of full, tiny"):
        validate(TURBO, prompt="x", vae="medium")


def test_random_seeds_differ_and_given_seeds_are_kept():
    seeds = {validate(TURBO, prompt="x").seed for _ in range(5)}
    assert len(seeds) > 1
    assert validate(TURBO, prompt="x", seed=7).seed == 7


def test_integral_floats_are_accepted_as_whole_numbers():
    assert validate(TURBO, prompt="x", num_outputs=2.0, width=512.0).num_outputs == 2


@pytest.mark.parametrize("name, value", [("num_outputs", True), ("seed", "12"), ("width", 512.5), ("strength", None)])
def test_wrong_types_name_the_input(name, value):
    with pytest.raises(InputError, match=name):
        validate(TURBO, prompt="x", **{name: value})


def test_image_to_image_keeps_the_input_size_rounded_to_multiples_of_8(input_image):
    request = validate(TURBO, prompt="x", image=input_image(100, 70))
    assert (request.width, request.height) == (104, 72)
    assert request.image.size == (104, 72)


def test_image_to_image_scales_a_large_input_into_the_pixel_budget(input_image):
    request = validate(TURBO, prompt="x", image=input_image(3000, 1500))
    assert request.width * request.height <= TURBO.max_pixels
    assert request.width % 8 == 0 and request.height % 8 == 0
    assert abs(request.width / request.height - 2) < 0.05


def test_image_to_image_with_one_side_keeps_the_aspect_ratio(input_image):
    request = validate(TURBO, prompt="x", image=input_image(200, 100), width=256)
    assert (request.width, request.height) == (256, 128)


def test_image_to_image_with_both_sides_is_fitted_without_stretching(input_image, tmp_path):
    # Left half red, right half blue: a centre crop to a square keeps both colours side by side.
    source = Image.new("RGB", (200, 100), (255, 0, 0))
    source.paste((0, 0, 255), (100, 0, 200, 100))
    path = tmp_path / "halves.png"
    source.save(path)
    request = validate(TURBO, prompt="x", image=path, width=64, height=64)
    assert request.image.size == (64, 64)
    assert request.image.getpixel((5, 32))[0] > 200 and request.image.getpixel((58, 32))[2] > 200


def test_image_to_image_default_steps_keep_the_variants_effective_steps(input_image):
    image = input_image(64, 64)
    assert validate(TURBO, prompt="x", image=image, strength=0.5).num_inference_steps == 2
    assert validate(SDXL_LCM, prompt="x", image=image, strength=0.5).num_inference_steps == 8
    request = validate(TURBO, prompt="x", image=image, strength=0.3)
    assert int(request.num_inference_steps * request.strength) == 1


def test_image_to_image_below_one_step_is_an_error_not_a_no_op(input_image):
    with pytest.raises(InputError, match=r"strength x num_inference_steps .* 0.5 x 1"):
        validate(TURBO, prompt="x", image=input_image(64, 64), strength=0.5, num_inference_steps=1)
    with pytest.raises(InputError, match="strength"):
        validate(TURBO, prompt="x", image=input_image(64, 64), strength=0.0)


def test_pixel_budgets_bound_each_image_and_the_batch():
    with pytest.raises(InputError, match="width x height must be at most"):
        validate(TURBO, prompt="x", width=2048, height=1024)
    with pytest.raises(InputError, match="num_outputs x width x height"):
        validate(TURBO, prompt="x", width=1024, height=1024, num_outputs=8)
    assert validate(TURBO, prompt="x", width=512, height=512, num_outputs=8).num_outputs == 8


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (120, 80), "white").save(path, exif=exif)
    assert images.open_input_image(path).size == (80, 120)


@pytest.mark.parametrize(
    "raw, message",
    [
        (dict(seed=-1), r"^seed must be between 0 and 4294967295, got -1\.$"),
        (dict(seed=2**33), r"^seed must be between 0 and 4294967295, got 8589934592\.$"),
        (dict(guidance_scale=20.5), r"^guidance_scale must be between 0 and 20, got 20\.5\.$"),
        (dict(prompt=None), r"^prompt is required\.$"),
    ],
)
def test_messages_give_limits_in_full_and_read_as_one_sentence(raw, message):
    with pytest.raises(InputError, match=message):
        validate(TURBO, **{"prompt": "x", **raw})


def test_unreadable_and_oversized_images_are_input_errors(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="image is not a readable image"):
        images.open_input_image(junk)
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 5000)).save(huge)
    with pytest.raises(InputError, match="at most 40000000 pixels"):
        images.open_input_image(huge)
    with pytest.raises(InputError, match="could not be read"):
        images.open_input_image(tmp_path / "absent.png")


def test_a_decompression_bomb_is_refused_as_too_large_before_it_is_decoded(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)  # ~400 KB of file, 400 megapixels
    assert bomb.stat().st_size < 2_000_000
    with pytest.raises(InputError, match=r"^image must have at most 40000000 pixels, got 400000000\.$"):
        images.open_input_image(bomb)


def opened(tmp_path, image: Image.Image, suffix: str = ".png") -> Image.Image:
    """What image-to-image starts from: the decoded input, flattened over white."""
    path = tmp_path / f"input{suffix}"
    image.save(path)
    return images.flatten(images.open_input_image(path))


def test_every_mode_pillow_opens_becomes_8_bit_rgb_without_clipping(tmp_path):
    import numpy as np

    # 16-bit greyscale: 30000 of 65535 is mid-grey (117), not white.
    sixteen = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
    assert opened(tmp_path, sixteen).getpixel((0, 0)) == (117, 117, 117)
    # 32-bit float TIFF in 0..1.
    floats = Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32), mode="F")
    assert opened(tmp_path, floats, ".tif").getpixel((0, 0)) == (128, 128, 128)
    # Transparency is laid over white: LA, RGBA, and a palette with a transparent colour.
    assert opened(tmp_path, Image.new("LA", (8, 8), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert opened(tmp_path, Image.new("RGBA", (8, 8), (10, 20, 30, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    assert opened(tmp_path, palette).getpixel((0, 0)) == (255, 255, 255)
    # CMYK (JPEG, TIFF) and 1-bit.
    cmyk = opened(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), ".jpg").getpixel((0, 0))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red
    assert opened(tmp_path, Image.new("1", (8, 8), 1)).getpixel((0, 0)) == (255, 255, 255)
    for image in (sixteen, floats, palette):
        assert opened(tmp_path, image, ".tif" if image.mode == "F" else ".png").mode == "RGB"


@pytest.mark.parametrize("output_format, pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_encode_writes_the_requested_format(output_format, pil_format):
    encoded = images.encode(Image.new("RGB", (64, 48), "green"), output_format, 80)
    decoded = Image.open(io.BytesIO(encoded))
    assert (decoded.format, decoded.size) == (pil_format, (64, 48))


def test_the_input_table_is_what_predict_py_declares():
    """predict.py's literal defaults, bounds and choices (as Cog reads them) equal fastsd.inputs'
    table, input by input and in order: the schema's 422 and fastsd's sentences agree."""
    declared = read_inputs(PROJECT_ROOT / "predict.py")
    assert [field["name"] for field in declared] == list(INPUTS)
    for field in declared:
        row = INPUTS[field["name"]]
        assert field.get("default") == row.default, field["name"]
        assert (field.get("ge"), field.get("le")) == (row.low, row.high), field["name"]
        assert tuple(field.get("choices") or ()) == row.choices, field["name"]
        assert field["repeated"] == row.many, field["name"]


def test_an_input_that_does_not_exist_is_named():
    with pytest.raises(InputError, match=r"^widht is not an input") as error:
        validate(TURBO, prompt="x", widht=64)
    assert error.value.field == "widht"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"strength": 2}, "strength"),
        ({"seed": -1}, "seed"),
        ({"width": 65}, "width"),
        ({"image": b"not an image"}, "image"),
        ({"output_format": ["jpg"]}, "output_format"),
    ],
)
def test_each_refusal_carries_the_input_it_is_about(raw, field):
    with pytest.raises(InputError) as error:
        validate(TURBO, **{"prompt": "x", **raw})
    assert error.value.field == field and str(error.value).startswith(field)


def test_an_image_may_come_as_bytes():
    """A realtime frame reaches validation as its bytes, never a file."""
    request = validate(TURBO, prompt="x", image=png_bytes(96, 64), strength=0.5)
    assert request.image.size == (96, 64)
