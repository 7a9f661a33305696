"""FLUX.2 [klein], Z-Image-Turbo and FLUX.1 [schnell] on their tiny models: each task equals the
diffusers pipeline called as the model card shows (same weights, same seed, within one level of
255), seeds and batches as for every preset, the inputs they cannot honour refused before the
request queues, prompts read whole, fine-tunes detected from their configs. (Every task through
the real Cog server: tests/test_server.py, which runs for every preset.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastsd import images, variants
from fastsd.errors import ConfigurationError, InputError
from fastsd.families.flux2_tiny_vae import Flux2TinyAutoencoder
from fastsd.inputs import REFERENCE_PIXELS
from fastsd.settings import Settings
from fastsd.tasks import Task
from fastsd.weights.layout import model_folder
from fastsd_testing.helpers import load_engine

PRESETS = ("flux2-klein", "z-image-turbo", "flux-schnell")
PROMPT = "a red fox in fresh snow"
SIDE = 64


@pytest.fixture(scope="module")
def engines(weights_root):
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = load_engine(weights_root, name, safety_checker=False)
        return loaded[name]

    return get


@pytest.fixture(scope="module")
def stock(weights_root):
    """The diffusers pipeline of each preset's repo, loaded as its model card loads it (fp32 here)."""
    import diffusers

    loaded = {}

    def get(name: str, pipeline_class: str | None = None):
        folder = model_folder(weights_root, variants.VARIANTS[name].model)
        if name not in loaded:
            loaded[name] = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
            loaded[name].set_progress_bar_config(disable=True)
        base = loaded[name]
        return getattr(diffusers, pipeline_class).from_pipe(base, dtype=torch.float32) if pipeline_class else base

    return get


def picture(seed: int = 0, size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    generator = np.random.default_rng(seed)
    return Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same(ours: Image.Image, theirs: Image.Image) -> None:
    assert ours.size == theirs.size
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def card(name: str, **changes) -> dict:
    """The model card's call arguments for the preset (FLUX.1 [schnell]'s T5 read to 256 tokens)."""
    variant = variants.VARIANTS[name]
    called = dict(num_inference_steps=variant.num_inference_steps, guidance_scale=variant.guidance_scale)
    if variant.recipe.max_sequence_length:
        called["max_sequence_length"] = variant.recipe.max_sequence_length
    return {**called, **changes}


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# --- parity with the diffusers pipelines ---------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_text_to_image_is_the_model_cards_call(engines, stock, name):
    ours = engines(name).generate(engines(name).validate(prompt=PROMPT, seed=3, width=SIDE, height=80)).images[0]
    theirs = stock(name)(prompt=PROMPT, width=SIDE, height=80, generator=generator(3), **card(name)).images[0]
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("name", "pipeline_class"),
    [("z-image-turbo", "ZImageImg2ImgPipeline"), ("flux-schnell", "FluxImg2ImgPipeline")],
)
def test_image_to_image_is_the_diffusers_image_to_image_call(engines, stock, name, pipeline_class):
    engine = engines(name)
    request = engine.validate(prompt=PROMPT, seed=5, image=png(picture(1)), strength=0.5)
    ours = engine.generate(request).images[0]
    pipeline = stock(name, pipeline_class)
    theirs = pipeline(prompt=PROMPT, image=picture(1), strength=0.5, width=SIDE, height=SIDE, generator=generator(5),
                      **card(name, num_inference_steps=request.num_inference_steps)).images[0]  # fmt: skip
    assert_same(ours, theirs)


@pytest.mark.parametrize(
    ("name", "pipeline_class"),
    [
        ("flux2-klein", "Flux2KleinInpaintPipeline"),
        ("z-image-turbo", "ZImageInpaintPipeline"),
        ("flux-schnell", "FluxInpaintPipeline"),
    ],
)
def test_inpainting_repaints_as_diffusers_does_and_keeps_the_rest_exactly(engines, stock, name, pipeline_class):
    engine = engines(name)
    mask = Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = engine.validate(prompt=PROMPT, seed=2, image=png(picture(2)), mask=png(mask), strength=0.75)
    ours = engine.generate(request).images[0]
    theirs = stock(name, pipeline_class)(
        prompt=PROMPT, image=picture(2), mask_image=mask, strength=0.75, width=SIDE, height=SIDE,
        generator=generator(2), **card(name, num_inference_steps=request.num_inference_steps),
    ).images[0]  # fmt: skip
    assert_same(ours, images.keep_unmasked(picture(2), theirs, mask))
    assert (pixels(ours)[:8, :8] == pixels(picture(2))[:8, :8]).all()  # far from the mask: the input's pixels


def test_klein_image_to_image_is_its_inpainting_pipeline_with_the_whole_image_masked(engines, stock):
    """diffusers has no klein image-to-image pipeline; fastsd's (the text-to-image one from prepared
    latents and the schedule's tail) draws what the inpainting one draws when all of it repaints."""
    engine = engines("flux2-klein")
    request = engine.validate(prompt=PROMPT, seed=9, image=png(picture(4)), strength=0.5, num_inference_steps=4)
    assert request.task is Task.IMAGE_TO_IMAGE
    ours = engine.generate(request).images[0]
    theirs = stock("flux2-klein", "Flux2KleinInpaintPipeline")(
        prompt=PROMPT, image=picture(4), mask_image=Image.new("L", (SIDE, SIDE), 255), strength=0.5, width=SIDE,
        height=SIDE, num_inference_steps=4, guidance_scale=1.0, generator=generator(9),
    ).images[0]  # fmt: skip
    assert_same(ours, theirs)


def test_klein_image_to_image_at_full_strength_is_text_to_image(engines):
    engine = engines("flux2-klein")
    drawn = engine.generate(engine.validate(prompt=PROMPT, seed=4, width=SIDE, height=SIDE)).images[0]
    started = engine.validate(prompt=PROMPT, seed=4, image=png(picture(3)), strength=1.0, num_inference_steps=4)
    assert_same(engine.generate(started).images[0], drawn)
    kept = engine.validate(prompt=PROMPT, seed=4, image=png(picture(3)), strength=0.25, num_inference_steps=4)
    near = np.abs(pixels(engine.generate(kept).images[0]) - pixels(picture(3))).mean()
    assert near < np.abs(pixels(drawn) - pixels(picture(3))).mean()  # a low strength stays nearer the image


def test_klein_reference_images_are_the_pipelines_image_argument(engines, stock):
    engine = engines("flux2-klein")
    references = [picture(5, (96, 64)), picture(6)]
    seen: list[int] = []  # the transformer's image-side tokens per call: the image's, then each reference's
    transformer = engine.pipelines.text_to_image.transformer
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        request = engine.validate(prompt="the two", seed=1, width=SIDE, height=SIDE,
                                  reference_images=[png(r) for r in references])  # fmt: skip
        ours = engine.generate(request).images[0]
    finally:
        hook.remove()
    assert set(seen) == {(SIDE // 16) ** 2 + (96 // 16) * (64 // 16) + (SIDE // 16) ** 2}
    theirs = stock("flux2-klein")(prompt="the two", image=references, width=SIDE, height=SIDE, generator=generator(1),
                                  **card("flux2-klein")).images[0]  # fmt: skip
    assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["z-image-turbo", "flux-schnell"])
def test_the_tiny_vae_is_taef1_swapped_into_the_stock_pipeline(engines, stock, weights_root, name):
    from diffusers import AutoencoderTiny

    ours = engines(name).generate(
        engines(name).validate(prompt=PROMPT, seed=8, vae="tiny", **{"width": SIDE, "height": SIDE})
    )
    taef1 = AutoencoderTiny.from_pretrained(model_folder(weights_root, variants.TINY_VAE_FOR[variants.FLUX1]))
    pipeline = stock(name).__class__.from_pipe(stock(name), vae=taef1, dtype=torch.float32)
    theirs = pipeline(prompt=PROMPT, width=SIDE, height=SIDE, generator=generator(8), **card(name)).images[0]
    assert_same(ours.images[0], theirs)


def test_klein_tiny_vae_decodes_the_transformers_normalised_patches(engines, stock, weights_root):
    """fal's decoder reads the transformer's latents as they are: un-normalising and un-patching
    them first (what the pipeline does for FLUX.2's own autoencoder) must be undone exactly."""
    engine = engines("flux2-klein")
    ours = engine.generate(engine.validate(prompt=PROMPT, seed=6, vae="tiny", width=SIDE, height=SIDE)).images[0]
    pipeline = stock("flux2-klein")
    # Un-normalised and un-patched, as FLUX.2's own decoder reads them:
    latents = pipeline(prompt=PROMPT, width=SIDE, height=SIDE, generator=generator(6), output_type="latent",
                       **card("flux2-klein")).images  # fmt: skip
    mean = pipeline.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipeline.vae.bn.running_var.view(1, -1, 1, 1) + pipeline.vae.config.batch_norm_eps)
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
    normalised = (patches.reshape(batch, channels * 4, height // 2, width // 2) - mean) / std
    tiny = Flux2TinyAutoencoder.from_pretrained(model_folder(weights_root, variants.TINY_VAE_FOR[variants.FLUX2_KLEIN]))
    with torch.no_grad():
        inner = tiny.extra_decoder(normalised)
        decoded = tiny.tiny_vae.decode(tiny.residual_decoder(inner) + inner).sample
    theirs = pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
    assert_same(ours, theirs)


# --- seeds, batches, sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_image_i_of_a_request_is_seed_plus_i_and_a_batch_of_requests_draws_each_alone(engines, name):
    engine = engines(name)
    pair = engine.generate(engine.validate(prompt=PROMPT, seed=20, num_outputs=2, width=SIDE, height=SIDE)).images
    second = engine.generate(engine.validate(prompt=PROMPT, seed=21, width=SIDE, height=SIDE)).images[0]
    assert_same(pair[1], second)
    other = engine.validate(prompt="a lighthouse, a longer prompt than the first", seed=21, width=SIDE, height=SIDE)
    first = engine.validate(prompt=PROMPT, seed=20, width=SIDE, height=SIDE)
    batched = engine.generate_batch([first, other])
    assert batched[0].batch_size == 2
    assert_same(batched[0].images[0], pair[0])
    assert_same(batched[1].images[0], engine.generate(other).images[0])


def test_requests_with_other_reference_images_do_not_share_a_call(engines):
    from fastsd.engine import batch_key

    engine = engines("flux2-klein")
    one = engine.validate(prompt=PROMPT, seed=1, reference_images=[png(picture(1))], width=SIDE, height=SIDE)
    same = engine.validate(prompt="x", seed=2, reference_images=[png(picture(1))], width=SIDE, height=SIDE)
    other = engine.validate(prompt=PROMPT, seed=1, reference_images=[png(picture(2))], width=SIDE, height=SIDE)
    assert batch_key(one) == batch_key(same) != batch_key(other)


def test_a_large_reference_is_read_at_one_megapixel_in_multiples_of_16(engines):
    engine = engines("flux2-klein")
    request = engine.validate(prompt=PROMPT, reference_images=[png(picture(1, (2000, 1100)))], width=SIDE, height=SIDE)
    (reference,) = request.references
    assert reference.width * reference.height <= REFERENCE_PIXELS
    assert reference.width % 16 == 0 and reference.height % 16 == 0 and reference.width > reference.height


# --- what each preset refuses, and prompts ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "field", "sentence"),
    [
        ("flux2-klein", {"negative_prompt": "blur"}, "negative_prompt", "no effect on flux2-klein"),
        ("flux-schnell", {"guidance_scale": 3.5}, "guidance_scale", "fixed at 0 on flux-schnell"),
        ("flux2-klein", {"width": 72}, "width", "multiple of 16 between 64 and 2048 for flux2-klein"),
        ("z-image-turbo", {"reference_images": [b"x"]}, "reference_images", "z-image-turbo has no such mode"),
        ("flux2-klein", {"controlnet": "depth"}, "controlnet", r"no depth ControlNet is published for FLUX.2 \[kl"),
        ("flux2-klein", {"prompt": '("a", "b").blend(1, 1)'}, "prompt", "reads one text"),
        (
            "flux-schnell",
            {"prompt": "word " * 300},
            "prompt",
            r"takes \d+ tokens; flux-schnell's T5 encoder reads at most 256",
        ),  # fmt: skip
    ],
)
def test_what_a_preset_cannot_honour_is_refused_naming_the_input_and_the_preset(engines, name, raw, field, sentence):
    with pytest.raises(InputError, match=sentence) as refused:
        engines(name).validate(**{"prompt": PROMPT, **raw})
    assert refused.value.field == field


def test_z_image_honours_a_negative_prompt_with_guidance(engines):
    engine = engines("z-image-turbo")
    plain = engine.generate(engine.validate(prompt=PROMPT, seed=1, guidance_scale=3, width=SIDE, height=SIDE))
    negative = engine.validate(prompt=PROMPT, seed=1, guidance_scale=3, negative_prompt="snow", width=SIDE, height=SIDE)
    assert np.abs(pixels(engine.generate(negative).images[0]) - pixels(plain.images[0])).max() > 1


@pytest.mark.parametrize("name", PRESETS)
def test_long_prompts_are_read_whole_within_the_encoders_budget(engines, name):
    """Past CLIP's 77 tokens nothing is chunked or dropped: two prompts that differ only in their
    last word, more than 100 tokens in, are encoded differently, and each is refused only past the
    encoder's budget."""
    engine = engines(name)
    prompts = engine.prompts._encoder  # the family's (fastsd.families.plain_prompts)
    words = "a fox "
    while prompts._count_tokens(words) < 100:
        words += "a fox "
    assert prompts._count_tokens(words + "in snow") <= prompts.budget
    snow, rain = (engine.prompts.get(words + ending, None, False)["prompt_embeds"] for ending in ("in snow", "in rain"))
    first = lambda embeds: embeds[0] if isinstance(embeds, list) else embeds  # noqa: E731 - Z-Image's is a list
    assert first(snow).shape != first(rain).shape or not torch.allclose(first(snow), first(rain))
    engine.validate(prompt=words + "in snow")  # within the budget: accepted


@pytest.mark.parametrize("name", PRESETS)
def test_weighted_words_are_encoded_without_their_syntax_and_the_log_says_so(engines, name):
    engine = engines(name)
    weighted = engine.validate(prompt="a (red:1.4) fox, [snow]", seed=2, width=SIDE, height=SIDE)
    plain = engine.validate(prompt="a red fox, snow", seed=2, width=SIDE, height=SIDE)
    assert_same(engine.generate(weighted).images[0], engine.generate(plain).images[0])
    assert any("weighting is not applied" in line and "'a red fox, snow'" in line for line in engine.describe(weighted))
    assert not any("weighting" in line for line in engine.describe(plain))


# --- deployments and fine-tunes ----------------------------------------------------------------------


def test_a_controlnet_no_one_publishes_stops_setup_with_one_sentence():
    with pytest.raises(ConfigurationError, match=r"no canny ControlNet is published for FLUX.2 \[klein\] models"):
        variants.variant_for(Settings(variant="flux2-klein", controlnets=("canny",)), lambda model: None)


def test_fine_tunes_run_the_schedule_their_configs_say(weights_root, tmp_path):
    import json
    import shutil

    def copy(name: str, **changes) -> tuple:
        folder = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(model_folder(weights_root, variants.VARIANTS[name].model), folder)
        for relative, values in changes.items():
            path = folder / relative
            path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
        variant = variants.custom_variant(str(folder), folder)
        return variant.architecture, variant.num_inference_steps, variant.guidance_scale, variant.recipe.guidance

    assert copy("flux2-klein") == (variants.FLUX2_KLEIN, 4, 1.0, variants.DISTILLED)
    base = copy("flux2-klein", **{"model_index.json": {"is_distilled": False}})
    assert base == (variants.FLUX2_KLEIN, 50, 4.0, variants.CFG)
    dev = copy("flux-schnell", **{"transformer/config.json": {"guidance_embeds": True}})
    assert dev == (variants.FLUX1, 28, 3.5, variants.EMBEDDED)
    assert copy("z-image-turbo")[:3] == (variants.ZIMAGE, 9, 0.0)
    with pytest.raises(ConfigurationError, match="FASTSD_ACCELERATION=lcm-lora does not apply to .* a FLUX.1 model"):
        variants.custom_variant("someone/flux", next(tmp_path.glob("flux-schnell-*")), "lcm-lora")
