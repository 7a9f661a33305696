"""On CUDA (and with FASTSD_GRAPHS=on) the images stay on the device until they are encoded: inpainting's
composite (fastsd.gpu.postprocess.keep_unmasked) and the safety models' preprocessing (their
torchvision image processors, given the uint8 tensors) run there. On the CPU the tensors are CPU
tensors: the same code, checked here against the host path (images.keep_unmasked, PIL input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_inpainting import FAR, SIZE, box_mask, photo
from test_safety import checked_root

from fastsd import images, variants
from fastsd.gpu import GRAPHS_ENV, postprocess
from fastsd.safety import SafetyChecker
from fastsd_testing import random_models
from fastsd_testing.helpers import load_engine


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def as_array(frames: torch.Tensor) -> list[np.ndarray]:
    return [frame.permute(1, 2, 0).numpy().astype(int) for frame in frames]


def mask_with_grey() -> Image.Image:
    """A white box, a grey ramp beside it and a lone grey pixel: every kind of blend."""
    mask = np.asarray(box_mask(24, 16, 48, 40), dtype=np.uint8).copy()
    mask[16:40, 48:64] = np.linspace(200, 20, 16, dtype=np.uint8)
    mask[4, 90] = 128
    return Image.fromarray(mask)


def test_the_device_composite_is_keep_unmasked_and_keeps_the_original_where_the_mask_is_black():
    original, mask = photo(3), mask_with_grey()
    generated = [photo(4), Image.fromarray(np.full((SIZE[1], SIZE[0], 3), (255, 0, 128), dtype=np.uint8))]
    on_device = postprocess.keep_unmasked(original, torch.stack([as_tensor(g) for g in generated]), mask)
    untouched = np.asarray(images.soft_edge(mask)) == 0
    assert FAR[untouched].any() and untouched.sum() < untouched.size - 24 * 24  # kept pixels, and a blend
    for got, image in zip(as_array(on_device), generated, strict=True):
        expected = np.asarray(images.keep_unmasked(original, image, mask), dtype=int)
        assert np.abs(got - expected).max() <= 1
        assert np.array_equal(got[untouched], np.asarray(original, dtype=int)[untouched])
        assert np.array_equal(got[16:40, 24:48], np.asarray(image, dtype=int)[16:40, 24:48])  # white: generated


def ordinary_images() -> list[Image.Image]:
    """A square and a wide image (the checker's processor crops it), smooth and noisy."""
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    across, down = np.tile(ramp, (64, 1)), np.tile(ramp[:64, None], (1, 96))
    smooth = np.stack([(across + down) / 2, across, down], -1)
    return [
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        Image.fromarray(smooth.round().astype(np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)),
    ]


@pytest.mark.parametrize(
    "flags, verdict, expected",
    [
        (random_models.FLAG_EVERYTHING, random_models.UNSAFE, True),
        (random_models.FLAG_EVERYTHING, random_models.SAFE, False),
        (random_models.FLAG_NOTHING, random_models.UNSAFE, False),
    ],
)
def test_device_preprocessing_gives_the_host_paths_verdicts(
    weights_root, tmp_path, monkeypatch, flags, verdict, expected
):
    root = checked_root(weights_root, tmp_path, flags, verdict)
    safety = SafetyChecker.load(variants.VARIANTS["sd-turbo"], root, "cpu", torch.float32)
    pictures = ordinary_images()
    on_host = safety.withheld(pictures)
    assert on_host == [expected] * len(pictures)
    assert safety.withheld([as_tensor(picture) for picture in pictures]) == on_host


def test_the_classifier_reads_the_same_pixels_from_device_tensors(tmp_path):
    """The classifier's logits from tensors match those from PIL images within 1e-5 (on the CPU the
    pixels are identical; CUDA's resize differs by at most 1 level of 255: docs/performance.md)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPImageProcessor

    folder = random_models.build_nsfw_classifier(tmp_path / "classifier")
    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(classifier.classifier.weight, std=1.0)  # the fixture's head ignores the image
    processor = AutoImageProcessor.from_pretrained(folder)
    checker = random_models.build_safety_checker(tmp_path / "checker")
    extractor = CLIPImageProcessor.from_pretrained(checker / "feature_extractor")
    pictures = ordinary_images()
    tensors = [as_tensor(picture) for picture in pictures]
    with torch.inference_mode():
        host = classifier(pixel_values=processor(pictures, return_tensors="pt").pixel_values).logits
        device = classifier(pixel_values=processor(tensors, return_tensors="pt", device="cpu").pixel_values).logits
    assert host.std(dim=0).min() > 1e-3  # the logits depend on the image
    torch.testing.assert_close(device, host, rtol=0, atol=1e-5)
    clip_host = extractor(pictures, return_tensors="pt").pixel_values
    clip_device = extractor(tensors, return_tensors="pt", device="cpu").pixel_values
    torch.testing.assert_close(clip_device, clip_host, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def engines(weights_root):
    eager = load_engine(weights_root, "sd-turbo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(GRAPHS_ENV, "on")
        graphed = load_engine(weights_root, "sd-turbo")
    return eager, graphed


def saved(image: Image.Image, path) -> str:
    image.save(path)
    return str(path)


def test_graphed_inpainting_composites_on_the_device_and_gives_the_eager_images(engines, monkeypatch, tmp_path):
    eager, graphed = engines
    original = photo()
    mask = saved(box_mask(24, 16, 64, 40), tmp_path / "mask.png")
    request = dict(prompt="a red door", image=saved(original, tmp_path / "image.png"), mask=mask, seed=3, num_outputs=2)
    expected = eager.generate(eager.validate(**request)).images

    def host_composite(*arguments, **options):
        raise AssertionError("the graphs path composited on the host")

    monkeypatch.setattr(images, "keep_unmasked", host_composite)
    got = graphed.generate(graphed.validate(**request)).images
    for image, reference in zip(got, expected, strict=True):
        pixels = np.asarray(image, dtype=int)
        assert np.abs(pixels - np.asarray(reference, dtype=int)).max() <= 1
        assert np.array_equal(pixels[FAR], np.asarray(original, dtype=int)[FAR])


def test_graphed_outpainting_of_a_transparent_image_gives_the_eager_image(engines, tmp_path):
    eager, graphed = engines
    canvas = np.asarray(photo(2).convert("RGBA")).copy()
    canvas[:, 72:, 3] = 0
    request = dict(prompt="a wall", image=saved(Image.fromarray(canvas), tmp_path / "canvas.png"), seed=1)
    expected = eager.generate(eager.validate(**request)).images[0]
    got = graphed.generate(graphed.validate(**request)).images[0]
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_graphed_safety_check_withholds_what_the_eager_one_does(weights_root, tmp_path, monkeypatch):
    root = checked_root(weights_root, tmp_path, random_models.FLAG_EVERYTHING, random_models.UNSAFE)
    monkeypatch.setenv(GRAPHS_ENV, "on")
    graphed = load_engine(root, "sd-turbo")
    result = graphed.generate(graphed.validate(prompt="a kite", seed=2, num_outputs=2, width=64, height=64))
    assert (result.withheld, result.images) == (2, [])
    unchecked = graphed.validate(prompt="a kite", seed=2, width=64, height=64, disable_safety_checker=True)
    assert len(graphed.generate(unchecked).images) == 1


@pytest.mark.parametrize("name", ["flux2-klein", "z-image-turbo", "flux-schnell"])
def test_the_transformers_finish_on_the_device_as_on_the_host(weights_root, name, tmp_path):
    """What runs on CUDA for them (DeviceFinish: the pipeline's tensors, uint8 and the composite on
    the device), here on CPU tensors, against the host path."""
    from fastsd.finish import DeviceFinish, Finish

    engine = load_engine(weights_root, name)
    assert type(engine.finish) is Finish  # a CPU engine finishes on the host
    mask = saved(box_mask(16, 16, 48, 48), tmp_path / "mask.png")
    requests = [dict(prompt="a red door", seed=3, width=64, height=64, num_outputs=2),
                dict(prompt="a red door", image=saved(photo(), tmp_path / "image.png"), mask=mask, seed=3)]  # fmt: skip
    expected = [engine.generate(engine.validate(**request)).images for request in requests]
    engine.finish = DeviceFinish(engine.pipelines.safety)
    for request, wanted in zip(requests, expected, strict=True):
        got = engine.generate(engine.validate(**request)).images
        for image, reference in zip(got, wanted, strict=True):
            assert np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).max() <= 1
