"""The engine without Cog: what setup builds, and what one request does to the pipelines."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastsd import pipelines, variants
from fastsd.engine import Engine
from fastsd.errors import ConfigurationError, InputError
from fastsd.settings import Settings
from fastsd.tasks import Task
from fastsd.weights.layout import LORA, repo_folder

SMALL = dict(width=64, height=64)


@pytest.fixture(scope="module")
def engines(weights_root):
    """One engine per variant, loaded on first use (setup is the expensive part)."""
    loaded = {}

    def get(name: str) -> Engine:
        if name not in loaded:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
                loaded[name] = Engine.load(variants.VARIANTS[name], Settings.from_environment())
        return loaded[name]

    return get


def batch_sizes(module: torch.nn.Module):
    """Record the batch size of every call of a real module (a forward hook)."""
    sizes = []
    handle = module.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    return sizes, handle


def generate(engine: Engine, **raw):
    return engine.generate(engine.validate(**raw))


@pytest.mark.parametrize(
    "name, scheduler, spacing",
    [
        ("sd-turbo", "EulerDiscreteScheduler", "trailing"),
        ("sdxl-turbo", "EulerAncestralDiscreteScheduler", "trailing"),
        ("sd15-lcm", "LCMScheduler", None),
        ("sdxl-lcm", "LCMScheduler", None),
        ("lcm-dreamshaper", "LCMScheduler", None),
        ("sd15", "PNDMScheduler", None),
        ("sdxl", "EulerDiscreteScheduler", None),
        ("sdxl-lightning", "EulerDiscreteScheduler", "trailing"),
        ("hyper-sdxl", "TCDScheduler", None),
        ("hyper-sd15", "TCDScheduler", None),
        ("tcd-sdxl", "TCDScheduler", None),
        ("tcd-sd15", "TCDScheduler", None),
        ("dmd2-sdxl", "LCMScheduler", None),
    ],
)
def test_each_variant_gets_its_scheduler(engines, name, scheduler, spacing):
    engine = engines(name)
    assert type(engine.pipelines.text_to_image.scheduler).__name__ == scheduler
    if spacing:
        assert engine.pipelines.text_to_image.scheduler.config.timestep_spacing == spacing


def test_image_to_image_shares_the_text_to_image_weights(engines):
    engine = engines("sdxl-lcm")
    text, image = engine.pipelines.text_to_image, engine.pipelines.get(Task.IMAGE_TO_IMAGE, "full")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(image, component) is getattr(text, component)


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-lcm"])
def test_every_pipeline_keeps_the_chosen_dtype(weights_root, monkeypatch, name):
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    loaded = pipelines.load(variants.VARIANTS[name], Settings.from_environment(), "cpu", torch.bfloat16)
    assert set(loaded.vae_choices) == {"full", "tiny"}
    for mode, pipeline in loaded.by_key.items():
        for component in ("unet", "vae", "text_encoder"):
            assert getattr(pipeline, component).dtype == torch.bfloat16, (mode, component)
    assert loaded.get(Task.TEXT_TO_IMAGE, "tiny").vae is not loaded.text_to_image.vae
    assert loaded.get(Task.IMAGE_TO_IMAGE, "tiny").unet is loaded.text_to_image.unet
    for convolution in (
        loaded.text_to_image.unet.conv_in,
        loaded.text_to_image.vae.decoder.conv_out,
        loaded.get(Task.TEXT_TO_IMAGE, "tiny").vae.decoder.layers[0],
    ):
        assert convolution.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_full_vae_decodes_a_batch_one_image_at_a_time_and_the_tiny_one_whole(engines):
    """Slicing bounds the full decoder's memory per image; the tiny decoder keeps the batch."""
    engine = engines("sd-turbo")
    for vae, expected in (("full", [1, 1, 1]), ("tiny", [3])):
        sizes, handle = batch_sizes(engine.pipelines.get(Task.TEXT_TO_IMAGE, vae).vae.decoder)
        try:
            generate(engine, prompt="three kites", num_outputs=3, seed=3, vae=vae, **SMALL)
        finally:
            handle.remove()
        assert sizes == expected, vae


@pytest.mark.parametrize("vae", ["full", "tiny"])
def test_the_served_image_is_what_stock_diffusers_draws(use_weights, vae):
    """Fused modules, channels_last, cached embeddings: none of it may change the picture."""
    from diffusers import AutoencoderTiny, AutoPipelineForText2Image

    engine = Engine.load(variants.VARIANTS["sd-turbo"], Settings.from_environment(), "cpu", torch.float32)
    ours = np.asarray(generate(engine, prompt="a red kite", seed=5, vae=vae, **SMALL).images[0], dtype=int)
    stock = AutoPipelineForText2Image.from_pretrained(
        use_weights / "weights" / "stabilityai" / "sd-turbo", dtype=torch.float32
    )
    if vae == "tiny":
        stock.vae = AutoencoderTiny.from_pretrained(use_weights / "weights" / "madebyollin" / "taesd")
    with torch.inference_mode():
        theirs = stock(
            prompt="a red kite",
            num_inference_steps=1,
            guidance_scale=0.0,
            **SMALL,
            generator=torch.Generator("cpu").manual_seed(5),
        ).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=int)).max() <= 2


def test_the_fp16_fix_vae_replaces_the_sdxl_vae(engines, weights_root):
    vae = engines("sdxl-lcm").pipelines.text_to_image.vae
    fix = load_file(weights_root / "weights" / variants.SDXL_VAE_FP16_FIX / "diffusion_pytorch_model.safetensors")
    name, tensor = next(iter(fix.items()))
    assert torch.equal(vae.state_dict()[name], tensor.to(vae.dtype))


@pytest.mark.parametrize("name", ["sd15-lcm", "sdxl-lcm"])
def test_lcm_lora_is_fused_exactly_once(engines, weights_root, name):
    """Fused weight == base + (alpha / rank) * up @ down, for a layer the LoRA targets; no adapter left."""
    variant = variants.VARIANTS[name]
    unet = engines(name).pipelines.text_to_image.unet
    base = load_file(weights_root / "weights" / variant.model / "unet" / "diffusion_pytorch_model.safetensors")
    [lora_spec] = variant.recipe.loras
    lora = load_file(weights_root / "lora" / lora_spec.file.repo / lora_spec.file.filename)
    layer = next(n for n in unet.state_dict() if n.endswith("attn1.to_q.weight"))
    key = "lora_unet_" + layer.removesuffix(".weight").replace(".", "_")
    down, up = lora[f"{key}.lora_down.weight"].float(), lora[f"{key}.lora_up.weight"].float()
    scale = lora[f"{key}.alpha"].float() / down.shape[0]
    expected = base[layer].float() + scale * (up @ down)
    fused = unet.state_dict()[layer].float()
    assert torch.allclose(fused, expected, atol=1e-3)
    assert not torch.allclose(fused, base[layer].float() + 2 * scale * (up @ down), atol=1e-3)
    assert not any("lora" in module for module, _ in unet.named_modules())


@pytest.mark.parametrize("name", ["sd-turbo", "sdxl-lcm", "lcm-dreamshaper"])
def test_outputs_come_from_one_batched_call(engines, name):
    engine = engines(name)
    sizes, handle = batch_sizes(engine.pipelines.text_to_image.unet)
    try:
        result = generate(engine, prompt="four owls", num_outputs=4, num_inference_steps=1, seed=1, **SMALL)
    finally:
        handle.remove()
    assert len(result.images) == 4
    assert sizes == [4]  # one step, four images in one UNet call, no guidance batch


def test_guidance_above_1_doubles_the_batch_and_uses_the_negative_prompt(engines, caplog):
    engine = engines("sd15")
    sizes, handle = batch_sizes(engine.pipelines.text_to_image.unet)
    try:
        with caplog.at_level(logging.INFO, logger="fastsd"):
            generate(
                engine,
                prompt="a dog",
                negative_prompt="blur",
                guidance_scale=7.5,
                num_inference_steps=1,
                seed=1,
                **SMALL,
            )
            assert "negative_prompt ignored" not in caplog.text
            generate(
                engine,
                prompt="a dog",
                negative_prompt="blur",
                guidance_scale=1.0,
                num_inference_steps=1,
                seed=1,
                **SMALL,
            )
    finally:
        handle.remove()
    assert sizes == [2, 1]
    assert "negative_prompt ignored: guidance_scale 1 <= 1" in caplog.text


def test_the_negative_prompt_changes_a_guided_image(engines):
    engine = engines("sd15")
    common = dict(prompt="a dog", guidance_scale=7.5, num_inference_steps=2, seed=3, **SMALL)
    plain = np.asarray(generate(engine, **common).images[0], dtype=int)
    negative = np.asarray(generate(engine, negative_prompt="cats everywhere", **common).images[0], dtype=int)
    assert np.abs(plain - negative).max() > 0


def test_same_seed_same_image_and_image_i_of_a_batch_is_seed_plus_i(engines):
    engine = engines("sd-turbo")
    first = generate(engine, prompt="a kite", seed=40, num_outputs=2, **SMALL).images
    again = generate(engine, prompt="a kite", seed=40, num_outputs=2, **SMALL).images
    alone = generate(engine, prompt="a kite", seed=41, **SMALL).images[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert np.abs(np.asarray(first[1], dtype=int) - np.asarray(alone, dtype=int)).max() <= 2


def test_image_to_image_starts_from_the_image(engines, tmp_path):
    from PIL import Image

    engine = engines("sd-turbo")
    white, black = tmp_path / "white.png", tmp_path / "black.png"
    Image.new("RGB", (64, 64), "white").save(white)
    Image.new("RGB", (64, 64), "black").save(black)
    common = dict(prompt="x", strength=0.5, seed=9)
    from_white = np.asarray(generate(engine, image=white, **common).images[0], dtype=int)
    from_black = np.asarray(generate(engine, image=black, **common).images[0], dtype=int)
    assert from_white.shape == (64, 64, 3)
    assert from_white.mean() != from_black.mean()


def test_weights_variant_prefers_fp16_files_for_half_precision(weights_root):
    sd15 = weights_root / "weights" / "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert pipelines.weights_variant(sd15, torch.float16) == "fp16"
    assert pipelines.weights_variant(sd15, torch.bfloat16) == "fp16"
    assert pipelines.weights_variant(sd15, torch.float32) is None
    dreamshaper = weights_root / "weights" / "SimianLuo/LCM_Dreamshaper_v7"  # full precision only
    assert pipelines.weights_variant(dreamshaper, torch.float16) is None


def test_a_repo_mixing_fp16_and_full_precision_components_loads(weights_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    mixed = tmp_path / "mixed"
    shutil.copytree(weights_root / "weights" / "stabilityai/sd-turbo", mixed)
    (mixed / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (mixed / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    for dtype in (torch.float32, torch.bfloat16):
        assert pipelines.weights_variant(mixed, dtype) == "fp16"
    variant = variants.custom_variant(str(mixed), mixed, "none")
    loaded = pipelines.load(variant, Settings.from_environment(), "cpu", torch.float32)
    assert loaded.text_to_image.unet.dtype == torch.float32


def test_a_repo_with_only_fp16_files_loads_them_in_full_precision(weights_root, tmp_path):
    only_fp16 = tmp_path / "only-fp16"
    shutil.copytree(weights_root / "weights" / "stabilityai/sd-turbo", only_fp16)
    for full in only_fp16.glob("*/*.safetensors"):
        if not full.name.endswith(".fp16.safetensors"):
            full.unlink()
    assert pipelines.weights_variant(only_fp16, torch.float32) == "fp16"


def lora_repos(variant) -> list[str]:
    return [lora.file.repo for lora in variant.recipe.loras]


def test_custom_models_detect_their_architecture_and_lora(weights_root, monkeypatch):
    sd15 = weights_root / "weights" / "stable-diffusion-v1-5/stable-diffusion-v1-5"
    sdxl = weights_root / "weights" / "stabilityai/stable-diffusion-xl-base-1.0"
    turbo = weights_root / "weights" / "stabilityai/sd-turbo"
    custom = variants.custom_variant(str(sd15), sd15, "lcm-lora")
    assert (custom.architecture, lora_repos(custom), custom.num_inference_steps) == (
        variants.SD15,
        ["latent-consistency/lcm-lora-sdv1-5"],
        4,
    )
    custom = variants.custom_variant(str(sdxl), sdxl, "lcm-lora")
    assert (custom.architecture, lora_repos(custom), custom.width) == (
        variants.SDXL,
        ["latent-consistency/lcm-lora-sdxl"],
        1024,
    )
    assert lora_repos(variants.custom_variant(str(sdxl), sdxl, "none")) == []
    with pytest.raises(ConfigurationError, match=r"an SD 2.x model; for it choose one of: none\.$"):
        variants.custom_variant(str(turbo), turbo, "lcm-lora")
    with pytest.raises(ConfigurationError, match="FASTSD_ACCELERATION"):
        variants.custom_variant(str(sd15), sd15, "turbo")
    with pytest.raises(ConfigurationError, match="model_index.json"):
        variants.custom_variant("nowhere", weights_root / "nowhere", "none")


def test_a_custom_local_model_runs_with_its_lcm_lora(weights_root, tmp_path, monkeypatch):
    fine_tune = tmp_path / "my-fine-tune"
    shutil.copytree(weights_root / "weights" / "stable-diffusion-v1-5/stable-diffusion-v1-5", fine_tune)
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    monkeypatch.setenv("FASTSD_MODEL", str(fine_tune))
    monkeypatch.setenv("FASTSD_ACCELERATION", "lcm-lora")
    engine = Engine.from_settings(Settings.from_environment())
    assert lora_repos(engine.variant) == ["latent-consistency/lcm-lora-sdv1-5"]
    assert type(engine.pipelines.text_to_image.scheduler).__name__ == "LCMScheduler"
    assert generate(engine, prompt="x", seed=1, **SMALL).images[0].size == (64, 64)
    assert repo_folder(weights_root, LORA, lora_repos(engine.variant)[0]).is_dir()


def test_unknown_variant_names_the_choices(monkeypatch):
    monkeypatch.delenv("FASTSD_MODEL", raising=False)
    monkeypatch.setenv("FASTSD_VARIANT", "sd-hyper")
    with pytest.raises(ConfigurationError, match="sd-turbo, sdxl-turbo"):
        Engine.from_settings(Settings.from_environment())


@pytest.mark.slow
def test_compiled_modules_are_shared_and_give_the_same_image(weights_root, monkeypatch, tmp_path):
    """FASTSD_COMPILE compiles the UNet and decoders in place (about a minute on a 2-core CPU)."""
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(weights_root))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    request = dict(prompt="a compiled cat", seed=2, **SMALL)
    eager = Engine.load(variants.VARIANTS["sd-turbo"], Settings.from_environment(), "cpu", torch.float32)
    expected = np.asarray(generate(eager, **request).images[0], dtype=int)
    monkeypatch.setenv("FASTSD_COMPILE", "default")
    compiled = Engine.load(variants.VARIANTS["sd-turbo"], Settings.from_environment(), "cpu", torch.float32)
    unet = compiled.pipelines.text_to_image.unet
    assert unet._compiled_call_impl is not None
    assert compiled.pipelines.get(Task.IMAGE_TO_IMAGE, "tiny").unet is unet
    assert np.abs(np.asarray(generate(compiled, **request).images[0], dtype=int) - expected).max() <= 2


def test_without_the_tiny_vae_the_default_falls_back_and_asking_for_it_is_a_clear_error(
    weights_root, tmp_path, monkeypatch, caplog
):
    root = tmp_path / "root"
    shutil.copytree(
        weights_root / "weights" / "stabilityai" / "sd-turbo", root / "weights" / "stabilityai" / "sd-turbo"
    )
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(root))
    with caplog.at_level(logging.INFO, logger="fastsd"):
        # The safety checkers are not copied either: not what this test is about.
        engine = Engine.load(
            variants.VARIANTS["sd-turbo"].with_safety_checker(False), Settings.from_environment(), "cpu", torch.float32
        )
    assert engine.pipelines.vae_choices == ("full",)
    assert engine.validate(prompt="x").vae == "full"
    assert "madebyollin/taesd is not installed: using the full VAE" in caplog.text
    with pytest.raises(InputError, match="vae must be one of full on this deployment"):
        engine.validate(prompt="x", vae="tiny")


@pytest.mark.parametrize(
    "name, extra",
    [
        ("sd15", dict(negative_prompt="blurry", guidance_scale=7.5)),
        ("sdxl", dict(guidance_scale=5.0)),  # SDXL's zeroed negative embeddings for an empty negative prompt
        ("sdxl-lcm", dict(guidance_scale=1.0)),
        ("lcm-dreamshaper", dict(guidance_scale=8.0)),
    ],
)
def test_cached_prompt_embeddings_give_what_diffusers_gives_for_the_prompt(engines, name, extra):
    """The engine passes prompt embeddings from its cache; diffusers given the text must agree."""
    engine = engines(name)
    request = engine.validate(
        prompt="a lighthouse in fog", num_inference_steps=2, seed=21, vae="full", **SMALL, **extra
    )
    ours = np.asarray(engine.generate(request).images[0], dtype=int)
    again = np.asarray(engine.generate(request).images[0], dtype=int)  # from the cache this time
    stock_arguments = dict(
        prompt=request.prompt,
        num_inference_steps=2,
        guidance_scale=request.guidance_scale,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(21)],
    )
    if "negative_prompt" in extra:
        stock_arguments["negative_prompt"] = extra["negative_prompt"]
    with torch.inference_mode():
        stock = np.asarray(engine.pipelines.text_to_image(**stock_arguments).images[0], dtype=int)
    assert np.array_equal(ours, again)
    assert np.abs(ours - stock).max() <= 1


@pytest.mark.parametrize(
    "value, cuda, expected",
    [
        ("", True, None),
        ("0", True, None),
        ("false", False, None),
        ("1", True, "reduce-overhead"),  # the mode measured fastest on a GPU (benchmarks/gpu-h200-*.json)
        ("1", False, "default"),
        ("ON", False, "default"),
        ("max-autotune", True, "max-autotune"),  # a mode is taken as it is
        ("regional", True, "regional"),
    ],
)
def test_compile_mode_is_off_by_default_and_1_picks_the_devices_measured_mode(monkeypatch, value, cuda, expected):
    monkeypatch.setenv("FASTSD_COMPILE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert pipelines.compile_mode(Settings.from_environment().compile) == expected


def test_a_compile_mode_that_is_none_is_refused_with_one_sentence(monkeypatch):
    monkeypatch.setenv("FASTSD_COMPILE", "sometimes")
    with pytest.raises(ConfigurationError, match=r"^FASTSD_COMPILE='sometimes' is not allowed; write off"):
        Settings.from_environment()
