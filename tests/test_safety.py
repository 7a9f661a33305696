"""Safety checking through the real Cog server (sd-turbo), with checker fixtures in the real layouts
that flag every image or none, and NSFW classifiers that call every image safe or unsafe; the switch
(disable_safety_checker), the deployment setting (FASTSD_SAFETY_CHECKER=off) and the boot check."""

from __future__ import annotations

import pytest

from fastsd import variants
from fastsd.engine import Engine
from fastsd.errors import ContentWithheld
from fastsd.settings import Settings
from fastsd.weights import layout, provision
from fastsd_testing import random_models
from fastsd_testing.cog_server import decode_output, ready_server

SMALL = dict(prompt="a lighthouse at dusk", seed=7, width=64, height=64)
CHECKER_FOLDER = layout.Source(layout.SAFETY_CHECKER, variants.SAFETY_CHECKER_REPO).relative_folder
CLASSIFIER_FOLDER = layout.Source(layout.NSFW_CLASSIFIER, variants.NSFW_CLASSIFIER_REPO).relative_folder


def checked_root(weights_root, folder, flags: str | None, verdict: str | None):
    """A project root with the shared fixtures' models (linked) and checkers of its own at the
    paths download_weights.py fetches them to; None leaves a checker out."""
    for top in ("weights", "lora"):
        (folder / top).mkdir(parents=True)
        for entry in (weights_root / top).iterdir():
            if entry.name not in {CHECKER_FOLDER.parts[1], CLASSIFIER_FOLDER.parts[1]}:
                (folder / top / entry.name).symlink_to(entry)
    if flags:
        random_models.build_safety_checker(folder / CHECKER_FOLDER, flags=flags)
    if verdict:
        random_models.build_nsfw_classifier(folder / CLASSIFIER_FOLDER, verdict=verdict)
    return folder


def start(root, tmp_path_factory, **environment):
    """A ready sd-turbo server (unless FASTSD_VARIANT names another) on root's weights (a generator:
    stopped when closed)."""
    log_path = tmp_path_factory.mktemp("logs") / "safety.log"
    environment = {"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(root), **environment}
    return ready_server(environment, log_path)


def serving(weights_root, tmp_path_factory, flags: str, verdict: str):
    root = checked_root(weights_root, tmp_path_factory.mktemp(f"{flags}-{verdict}"), flags, verdict)
    yield from start(root, tmp_path_factory)


@pytest.fixture(scope="module")
def strict(weights_root, tmp_path_factory):
    """Both call every image NSFW."""
    yield from serving(weights_root, tmp_path_factory, random_models.FLAG_EVERYTHING, random_models.UNSAFE)


@pytest.mark.slow
def test_an_image_both_call_nsfw_is_withheld_and_the_request_fails_saying_so(strict):
    response = strict.predict(**SMALL)
    assert response["status"] == "failed"
    # Cog puts its own words before the sentence: "Prediction failed: ... ContentWithheld: ".
    assert response["error"].endswith(
        ": The safety checker withheld the image of this request as NSFW; try another prompt or seed."
    )
    assert strict.is_ready_again()
    several = strict.predict(**SMALL, num_outputs=3)
    assert several["status"] == "failed" and "withheld all 3 images" in several["error"]
    assert several["metrics"]["withheld"] == 3
    assert "the safety checker withheld 3 of 3 image(s)" in strict.log_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux2-klein", "z-image-turbo", "flux-schnell"])
def test_the_transformer_presets_are_checked_alike(weights_root, tmp_path_factory, name):
    """The same two checkers, on FLUX and Z-Image images: withheld, or returned when asked."""
    root = checked_root(weights_root, tmp_path_factory.mktemp(f"strict-{name}"), random_models.FLAG_EVERYTHING,
                        random_models.UNSAFE)  # fmt: skip
    server = start(root, tmp_path_factory, FASTSD_VARIANT=name)
    cog = next(server)
    try:
        withheld = cog.predict(**SMALL, num_outputs=2)
        assert withheld["status"] == "failed" and "withheld all 2 images" in withheld["error"], withheld.get("error")
        returned = cog.predict(**SMALL, disable_safety_checker=True)
        assert returned["status"] == "succeeded" and len(returned["output"]) == 1, returned.get("error")
    finally:
        server.close()


def test_disable_safety_checker_returns_the_images_and_the_next_request_is_checked_again(strict):
    response = strict.predict(**SMALL, num_outputs=2, disable_safety_checker=True)
    assert response["status"] == "succeeded", response.get("error")
    assert len(response["output"]) == 2 and response["metrics"]["withheld"] == 0
    for uri in response["output"]:
        assert decode_output(uri)[1].getextrema() != ((0, 0), (0, 0), (0, 0))  # no blacked-out image
    assert strict.predict(**SMALL)["status"] == "failed"


def test_no_image_is_blacked_out_in_place(strict):
    """diffusers' checker blacks out what it flags; fastsd leaves it out instead and says so."""
    response = strict.predict(**SMALL, num_outputs=2)
    assert response["status"] == "failed" and not response.get("output")


@pytest.fixture(scope="module")
def overruled(weights_root, tmp_path_factory):
    """The classic checker flags every image, the classifier calls every image safe."""
    yield from serving(weights_root, tmp_path_factory, random_models.FLAG_EVERYTHING, random_models.SAFE)


@pytest.mark.slow
def test_an_image_the_checker_flags_but_the_classifier_calls_safe_is_returned(overruled):
    response = overruled.predict(**SMALL, num_outputs=2)
    assert response["status"] == "succeeded", response.get("error")
    assert len(response["output"]) == 2 and response["metrics"]["withheld"] == 0
    assert "0 of 2 image(s) called NSFW by the classifier" in overruled.log_path.read_text()


@pytest.fixture(scope="module")
def lenient(weights_root, tmp_path_factory):
    """The classic checker flags nothing; the classifier calls every image NSFW."""
    yield from serving(weights_root, tmp_path_factory, random_models.FLAG_NOTHING, random_models.UNSAFE)


@pytest.mark.slow
def test_an_image_the_classifier_calls_nsfw_but_the_checker_passes_is_returned(lenient):
    response = lenient.predict(**SMALL, num_outputs=2)
    assert response["status"] == "succeeded", response.get("error")
    assert len(response["output"]) == 2 and response["metrics"]["withheld"] == 0
    assert response["metrics"]["safety_time"] > 0
    assert "2 of 2 image(s) called NSFW by the classifier, 0 of them flagged by the safety checker too" in (
        lenient.log_path.read_text()
    )


@pytest.mark.slow
def test_safety_checking_off_loads_nothing_and_warns(weights_root, tmp_path_factory):
    root = checked_root(weights_root, tmp_path_factory.mktemp("off"), None, None)
    running = start(root, tmp_path_factory, FASTSD_SAFETY_CHECKER="off")
    server = next(running)
    try:
        response = server.predict(**SMALL)
        assert response["status"] == "succeeded", response.get("error")
        log = server.log_path.read_text()
        assert "safety checking is off (FASTSD_SAFETY_CHECKER=off)" in log
        assert "safety checking is off on this deployment: 1 image(s) returned unchecked" in log
    finally:
        running.close()  # stops the server


def test_a_missing_checker_stops_setup_with_the_command_that_fetches_it(weights_root, tmp_path, monkeypatch):
    root = checked_root(weights_root, tmp_path / "root", None, random_models.SAFE)
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(root))
    variant = variants.VARIANTS["sd-turbo"]
    with pytest.raises(provision.WeightsMissing) as missing:
        provision.require_weights(variant, root)
    assert "safety_checker/config.json" in str(missing.value)
    assert str(missing.value).endswith("Fetch them with: .venv/bin/python scripts/download_weights.py sd-turbo")
    provision.require_weights(variant.with_safety_checker(False), root)  # off: not needed


def test_a_damaged_classifier_stops_setup(weights_root, tmp_path, monkeypatch):
    root = checked_root(weights_root, tmp_path / "root", random_models.FLAG_NOTHING, random_models.SAFE)
    weights = root / CLASSIFIER_FOLDER / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(root))
    with pytest.raises(provision.WeightsMissing, match="damaged"):
        provision.require_weights(variants.VARIANTS["sd-turbo"], root)


@pytest.mark.slow
def test_each_request_of_a_batch_is_checked_as_it_asked(weights_root, tmp_path, monkeypatch):
    """Requests batched into one call: the one that disabled checking gets its image, the other not."""
    root = checked_root(weights_root, tmp_path / "root", random_models.FLAG_EVERYTHING, random_models.UNSAFE)
    monkeypatch.setenv("FASTSD_WEIGHTS_ROOT", str(root))
    engine = Engine.load(variants.VARIANTS["sd-turbo"], Settings.from_environment(), "cpu")
    checked, unchecked = engine.validate(**SMALL), engine.validate(**SMALL, disable_safety_checker=True)
    withheld, returned = engine.generate_batch([checked, unchecked])
    assert (len(withheld.images), withheld.withheld) == (0, 1)
    assert (len(returned.images), returned.withheld) == (1, 0)
    with pytest.raises(ContentWithheld):
        engine.save(withheld, checked)
    assert len(engine.save(returned, unchecked)) == 1
