"""scripts/serve: the one command that starts the Cog server as the image does, for a user on any
machine (the worker on the .venv's interpreter whatever `python` PATH finds first, the slots
predict.py declares, the port asked for)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastsd_testing.cog_server import PROJECT_ROOT, _free_port, declared_concurrency


def _get(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    for _ in range(100):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # Cog 0.23's 409 for requests at the same instant
            if error.code != 409:
                raise
            time.sleep(0.01)
    raise AssertionError(f"{url} kept answering 409")


def test_serve_is_ready_on_its_port_with_the_declared_slots_whatever_python_comes_first(weights_root, tmp_path):
    # A PATH whose `python` is not the .venv's (or is missing): coglet's worker would fail to import.
    decoy = tmp_path / "decoy-bin"
    decoy.mkdir()
    (decoy / "python").write_text("#!/bin/sh\necho 'not the venv python' >&2\nexit 1\n")
    (decoy / "python").chmod(0o755)
    port = _free_port()
    environment = dict(
        os.environ,
        PATH=f"{decoy}:/usr/bin:/bin",
        FASTSD_VARIANT="sd-turbo",
        FASTSD_WEIGHTS_ROOT=str(weights_root),
        TMPDIR=str(tmp_path),
    )
    environment.pop("COG_MAX_CONCURRENCY", None)
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [PROJECT_ROOT / "scripts" / "serve", "--port", str(port)], env=environment, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, state = time.monotonic() + 300, {}
        while time.monotonic() < deadline and state.get("status") not in ("READY", "SETUP_FAILED"):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                state = _get(f"{url}/health-check", timeout=5)
            except OSError:
                pass
            time.sleep(0.3)
        assert state.get("status") == "READY", (tmp_path / "serve.log").read_text()[-3000:]
        text = (tmp_path / "serve.log").read_text()
        assert f"with {declared_concurrency()} slots" in text and f'"num_slots":{declared_concurrency()}' in text
        # More requests at once than a bare server's single slot: none is refused.
        body = {"input": {"prompt": "a kite", "width": 64, "height": 64}}
        with ThreadPoolExecutor(max_workers=3) as pool:
            answers = list(pool.map(lambda _: _get(f"{url}/predictions", body), range(3)))
        assert [answer["status"] for answer in answers] == ["succeeded"] * 3
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_serve_refuses_a_port_out_of_range():
    result = subprocess.run(
        [PROJECT_ROOT / "scripts" / "serve", "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "--port must be from 1 to 65535" in result.stderr


@pytest.fixture
def newcomers_server(tmp_path):
    """scripts/serve --random-weights on an empty weights folder, for a variant: a context that
    yields, once the server is ready, scripts/predict.py as a function of its NAME=VALUE arguments,
    and the server's log."""

    @contextlib.contextmanager
    def start(variant: str):
        import sys

        port = _free_port()
        root = tmp_path / "root"
        environment = dict(os.environ, FASTSD_VARIANT=variant, FASTSD_WEIGHTS_ROOT=str(root), TMPDIR=str(tmp_path))
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [PROJECT_ROOT / "scripts" / "serve", "--random-weights", "--port", str(port)],
                env=environment,
                stdout=log,
                stderr=log,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline, state = time.monotonic() + 300, {}
            while time.monotonic() < deadline and state.get("status") not in ("READY", "SETUP_FAILED"):
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    state = _get(f"{url}/health-check", timeout=5)
                except OSError:
                    pass
                time.sleep(0.3)
            assert state.get("status") == "READY", log_path.read_text()[-3000:]

            def predict(*inputs: str) -> subprocess.CompletedProcess:
                command = [sys.executable, PROJECT_ROOT / "scripts" / "predict.py", *inputs, "--url", url]
                return subprocess.run(command + ["--out", str(tmp_path / "out")], capture_output=True, text=True)

            yield predict, log_path
        finally:
            server.terminate()
            server.wait(timeout=30)

    return start


def test_a_newcomers_first_server_from_random_weights_to_an_image_file(tmp_path, newcomers_server):
    """The README's quick start on an empty weights folder: scripts/serve --random-weights writes the
    tiny model (with its manifests: no warning at start), serves with the image's input schema, and
    scripts/predict.py turns the answer into an image file."""
    from PIL import Image

    with newcomers_server("sd-turbo") as (predict, log_path):
        started = log_path.read_text()
        assert "has no .fastsd-manifest.json" not in started
        assert '"source":"Stderr"' not in started, started  # no library noise on a start
        made = predict('prompt="a lighthouse at dawn"', "seed=5", "width=64", "height=64")
        assert made.returncode == 0, made.stderr
        assert made.stdout.split() == [str(tmp_path / "out" / "fastsd-seed-5.webp")]
        assert Image.open(made.stdout.strip()).size == (64, 64) and '"seed": 5' in made.stderr
        refused = predict("prompt=a", "width=4096")  # the image's schema answers, as a built image does
        assert refused.returncode == 1 and "width: 4096 is greater than the maximum of 2048" in refused.stderr


def test_a_newcomer_edits_from_reference_images_with_flux2_klein(tmp_path, newcomers_server):
    """The README's klein line: two local images as reference_images, through the Cog server's list
    input, to an image file; and the sentence a preset without references answers with."""
    from PIL import Image

    for name, color in (("cat.png", (200, 120, 40)), ("sofa.png", (40, 60, 200))):
        Image.new("RGB", (96, 64), color).save(tmp_path / name)
    with newcomers_server("flux2-klein") as (predict, log_path):
        references = [f"reference_images=@{tmp_path / name}" for name in ("cat.png", "sofa.png")]
        made = predict("prompt=the cat on the sofa", "seed=2", "width=64", "height=64", *references)
        assert made.returncode == 0, made.stderr
        assert Image.open(made.stdout.strip()).size == (64, 64)
        assert "2 reference image(s)" in log_path.read_text()
        refused = predict("prompt=a cat", "negative_prompt=blur")
        assert refused.returncode == 1 and "negative_prompt has no effect on flux2-klein" in refused.stderr


def test_serve_without_the_hub_says_so_and_names_the_random_model(tmp_path):
    import sys

    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: the hub cannot be reached
    environment = dict(os.environ, FASTSD_VARIANT="sd-turbo", FASTSD_WEIGHTS_ROOT=str(tmp_path), HF_ENDPOINT=closed)
    result = subprocess.run(
        [sys.executable, "-m", "fastsd_testing.serve", "--port", str(_free_port())],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "cannot be reached" in result.stderr and "scripts/serve --random-weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_variant_option_is_named_as_the_option():
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fastsd.realtime", "--variant", "sdxl-turbo-v2"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "--variant 'sdxl-turbo-v2' is not a known variant" in result.stderr


def test_the_schema_reads_predict_py_as_cog_itself_does():
    """fastsd_testing.cog_schema reads run()'s source as Cog's static generator does; Cog's Python
    side (cog._inspector, the same pins) reads the imported signature: they must agree on every
    input's order, type, default, bounds, choices and description."""
    import sys

    from cog import _inspector
    from cog._adt import Repetition

    from fastsd_testing import cog_schema

    sys.path.insert(0, str(PROJECT_ROOT))
    try:
        info = _inspector.create_predictor("predict", "Predictor")
    finally:
        sys.path.remove(str(PROJECT_ROOT))
    ours = cog_schema.read_inputs(PROJECT_ROOT / "predict.py")
    assert [field["name"] for field in ours] == [
        name for name, _ in sorted(info.inputs.items(), key=lambda i: i[1].order)
    ]
    for field in ours:
        theirs = info.inputs[field["name"]]
        assert cog_schema._JSON_TYPES[field["type"]] == theirs.type.primitive.json_type(), field["name"]
        nullable, repeated = (
            (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED),
            (Repetition.REPEATED, Repetition.OPTIONAL_REPEATED),
        )
        assert field["nullable"] == (theirs.type.repetition in nullable), field["name"]
        assert field["repeated"] == (theirs.type.repetition in repeated), field["name"]
        for keyword in ("default", "ge", "le", "choices", "description"):
            assert field.get(keyword) == getattr(theirs, keyword), (field["name"], keyword)
    schema = cog_schema.openapi_schema()["components"]["schemas"]
    assert schema["Input"]["required"] == ["prompt"]
    assert schema["output_format"]["enum"] == ["webp", "jpg", "png"]
