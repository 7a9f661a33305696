"""The realtime page in a real browser: Debian's chromium, headless, driven by Playwright, against the
server on the tiny sd-turbo (a uvicorn server in this process, so the test can gate its model).

A user types, paints and makes a mistake; the page must show images, refine once typing rests,
send new frames for strokes, and show the server's error and then recover.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_realtime import Gate, wait_for

from fastsd.batching import Batcher
from fastsd.realtime.app import create_app
from fastsd.realtime.backend import EngineBackend
from fastsd_testing.realtime_server import serving

CHROMIUM = Path("/usr/bin/chromium")
# .ci/run sets FASTSD_REQUIRE_BROWSER: there a missing browser fails these tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None and not os.environ.get("FASTSD_REQUIRE_BROWSER"),
    reason="Debian's chromium is not installed (apt-get install chromium; scripts/setup-dev does it as root)",
)


@pytest.fixture(scope="module")
def gate(engine):
    made = Gate(engine)
    yield made
    made.remove()


@pytest.fixture(scope="module")
def engine(weights_root):
    from fastsd_testing.helpers import load_engine

    return load_engine(weights_root, "sd-turbo")


@pytest.fixture(scope="module")
def app(engine, gate):
    return create_app(EngineBackend(engine, Batcher(engine)))


@pytest.fixture(scope="module")
def url(app):
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # A fake camera (a moving test pattern) stands in for the webcam, granted without asking.
        fake_camera = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", *fake_camera])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, url, app):
    """The page, connected, at 64x64 (the tiny model's size), with its first image shown."""
    opened = browser.new_page()
    errors = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: message.type == "error" and errors.append(message.text))
    opened.goto(url)
    until_true(opened, "window.fastsd && window.fastsd.hello !== null")
    opened.select_option("#size", "64")
    shown_at_64(opened)
    until_true(opened, "window.fastsd.shown.at(-1).pass === 'refined'")  # the page rests: the refined image
    yield opened
    assert not errors, errors  # no script error on the page
    opened.close()


def until_true(page, expression: str, timeout: float = 60) -> None:
    """Waits for a condition on the page. (Playwright's wait_for_function evaluates a string with
    eval, which the page's Content-Security-Policy forbids, as it should.)"""
    wait_for(lambda: page.evaluate(expression), expression, timeout)


def shown_at_64(page):
    until_true(page, "document.querySelector('#output').naturalWidth === 64")


def count(page) -> int:
    return page.evaluate("window.fastsd.count")


def session_of(app):
    """The page's session (the one of a page closed before it may take a moment to go)."""
    wait_for(lambda: len(app.state.sessions) == 1, "one connected page")
    (only,) = app.state.sessions
    return only


def test_typing_shows_images_with_fewer_generations_than_keys_then_the_refined_one(page, app, gate):
    session = session_of(app)
    before, shown_before = session.counts["generations"], count(page)
    page.fill("#prompt", "")
    gate.hold()  # a model slower than the typist: keys arrive while it works
    text = "a red fox in fresh snow"
    page.locator("#prompt").press_sequentially(text, delay=15)
    wait_for(lambda: session.pending is not None and session.pending.refined, "the refine request after typing")
    refine = session.pending.number
    gate.open()
    until_true(page, f"window.fastsd.shown.at(-1).input === {refine}")
    generations = session.counts["generations"] - before
    assert 1 <= generations < len(text)
    assert count(page) - shown_before == generations  # every image made was shown
    assert session.params["prompt"] == text
    passes = [shown["pass"] for shown in page.evaluate("window.fastsd.shown")[shown_before:]]
    assert passes[-1] == "refined" and set(passes) <= {"fast", "refined"}


def test_strokes_on_the_canvas_send_new_frames(page, app):
    session = session_of(app)
    page.click("#tab-paint")
    wait_for(lambda: session.image is not None, "the blank canvas as the first frame")
    blank, inputs = session.image, session.counts["inputs"]
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + 20 + step * 30, box["y"] + 20 + step * 25)
    page.mouse.up()
    wait_for(lambda: session.image != blank, "a frame with the stroke")
    until_true(page, f"Number(document.querySelector('#output').dataset.input) > {inputs}")
    assert session.counts["inputs"] > inputs
    shown_at_64(page)


def test_the_page_shows_the_servers_error_and_recovers(page):
    shown = count(page)
    page.fill("#steps", "999")
    page.dispatch_event("#steps", "change")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "num_inference_steps" in notice.inner_text() and "between 1 and" in notice.inner_text()
    page.fill("#steps", "")
    page.dispatch_event("#steps", "change")
    notice.wait_for(state="hidden")  # the next image clears it
    assert count(page) > shown


def test_a_loaded_photo_and_the_webcam_become_frames(page, app, tmp_path):
    from fastsd_testing.helpers import png_bytes

    session = session_of(app)
    page.click("#tab-paint")
    wait_for(lambda: session.image is not None, "the blank canvas as the first frame")
    blank = session.image
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(300, 200, (30, 160, 60)))
    page.set_input_files("#photo", str(photo))
    wait_for(lambda: session.image != blank, "the photo as a frame")
    with_photo = session.image
    page.click("#webcam")
    wait_for(lambda: session.image != with_photo, "a webcam frame")
    first_camera_frame = session.image
    wait_for(lambda: session.image != first_camera_frame, "the next webcam frame")  # the pattern moves
    page.click("#webcam")  # off again
    assert page.get_attribute("#webcam", "aria-pressed") == "false"


def test_the_page_at_1200x900_shows_no_broken_image_and_no_cut_field(browser, url, gate):
    """Before the first image the frame is empty (no broken-image icon), and the widest values fit
    their fields: the steps placeholder and a 10-digit seed."""
    gate.hold()  # no image arrives while the empty page is looked at
    opened = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        opened.goto(url)
        until_true(opened, "window.fastsd && window.fastsd.hello !== null")
        assert opened.evaluate("document.querySelector('#output').hidden") is True
        opened.fill("#seed", "4294967295")
        for field in ("#steps", "#seed"):
            fits = f"(f => f.scrollWidth <= f.clientWidth)(document.querySelector('{field}'))"
            assert opened.evaluate(fits), field
        steps_text = opened.evaluate("document.querySelector('#steps').placeholder")
        assert steps_text.startswith("auto (")
        width_needed = opened.evaluate(
            """(f => { const c = document.createElement('canvas').getContext('2d');
                       c.font = getComputedStyle(f).font; return c.measureText(f.placeholder).width; })
               (document.querySelector('#steps'))"""
        )
        assert width_needed <= opened.evaluate("document.querySelector('#steps').clientWidth")
    finally:
        gate.open()
        opened.close()


# --- a transformer preset: FLUX.2 [klein] ----------------------------------------------------------


@pytest.fixture(scope="module")
def klein(weights_root):
    """The realtime server on the tiny FLUX.2 [klein] and the session it serves."""
    from fastsd_testing.helpers import load_engine

    engine = load_engine(weights_root, "flux2-klein")
    app = create_app(EngineBackend(engine, Batcher(engine)))
    with serving(app) as base:
        yield base, app


def test_flux2_klein_draws_as_you_type_and_paint_at_its_fast_then_refined_pass(browser, klein):
    """The page starts at 512x512 (the fast pass's size, not klein's 1024), says that painting
    drives image-to-image, and shows klein's 2-step pass with the tiny autoencoder, then its 4-step
    refined one; a stroke on the canvas sends a frame that comes back drawn."""
    url, app = klein
    opened = browser.new_page()
    errors = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        opened.goto(url)
        until_true(opened, "window.fastsd && window.fastsd.hello !== null")
        assert opened.evaluate("document.querySelector('#size').value") == "512"
        assert opened.evaluate("window.fastsd.hello.passes.fast") == {"num_inference_steps": 2, "vae": "tiny"}
        opened.select_option("#size", "64")
        opened.fill("#prompt", "a red fox in fresh snow")
        until_true(opened, "window.fastsd.shown.some(s => s.pass === 'fast')")
        until_true(opened, "window.fastsd.shown.at(-1).pass === 'refined'")
        assert "4 step(s)" in opened.inner_text("#details") and "full VAE" in opened.inner_text("#details")
        opened.click("#tab-paint")
        assert "Painting drives image-to-image on flux2-klein" in opened.inner_text("#paint-mode")
        session = session_of(app)
        wait_for(lambda: session.image is not None, "the blank canvas as the first frame")
        blank, inputs = session.image, session.counts["inputs"]
        box = opened.locator("#canvas").bounding_box()
        opened.mouse.move(box["x"] + 10, box["y"] + 10)
        opened.mouse.down()
        opened.mouse.move(box["x"] + 200, box["y"] + 150)
        opened.mouse.up()
        wait_for(lambda: session.image != blank, "a frame with the stroke")
        until_true(opened, f"Number(document.querySelector('#output').dataset.input) > {inputs}")
        shown_at_64(opened)
    finally:
        opened.close()
    assert not errors, errors
