"""Many clients at once, through the real Cog server with the slots a built image has: no 409 for
a client that waits for its reply, concurrent requests batched on the model and each given its own
images, cancellation that touches nothing else."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fastsd_testing.cog_server import declared_concurrency, output_pixels, ready_server

SMALL = dict(width=64, height=64, output_format="png")


@pytest.fixture(scope="module")
def server(weights_root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "concurrency.log"
    yield from ready_server({"FASTSD_VARIANT": "sd-turbo", "FASTSD_WEIGHTS_ROOT": str(weights_root)}, log_path)


pixels = output_pixels


def test_the_image_declares_several_slots():
    assert declared_concurrency() == 16


def test_back_to_back_requests_are_never_refused(server):
    # Sync Cog frees a slot a moment after it replies: 2 to 7 of 300 were refused. CogServer.predict
    # does not retry, so a single 409 fails this.
    for i in range(300):
        response = server.predict(prompt="a kite", seed=i, width=64, height=64)
        assert response["status"] == "succeeded", (i, response.get("error"))


def _hold_the_worker(server, results: dict) -> tuple[threading.Thread, str]:
    """A long request (many steps at a larger size) that the worker is running, so that what is
    sent next waits in fastsd's queue: whatever the timing, it is there when the worker is free."""
    held = str(uuid.uuid4())

    def long_request():
        results["held"] = server.predict_retrying(
            held, prompt="a long one", seed=1, num_inference_steps=50, width=512, height=512
        )

    since = server.log_size()
    thread = threading.Thread(target=long_request)
    thread.start()
    server.wait_for_log(["seed 1, 50 step(s)"], since)
    return thread, held


def _logged(request: dict) -> str:
    """What the worker logs for a request as it joins the queue."""
    return f"seed {request['seed']}, 1 step(s)"


def test_concurrent_requests_each_get_their_own_images(server):
    requests = [dict(prompt=f"a red kite number {i}", seed=100 + i, num_outputs=1 + i % 3, **SMALL) for i in range(8)]
    alone = [pixels(server.predict(**request)) for request in requests]
    results: dict = {}
    holder, held = _hold_the_worker(server, results)
    since = server.log_size()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        pending = [pool.submit(lambda request: server.predict_retrying(**request), request) for request in requests]
        server.wait_for_log([_logged(request) for request in requests], since)  # all eight queued
        assert server.cancel(held) == 200
        together = [future.result() for future in pending]
    holder.join(timeout=60)
    assert results["held"]["status"] == "canceled"
    batch_sizes = [response["metrics"]["batch_size"] for response in together]
    # Queued together, they ran together: 15 images in calls of up to 8 (the batch budget).
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 8, batch_sizes
    for request, expected, response in zip(requests, alone, together, strict=True):
        got = pixels(response)
        assert len(got) == request["num_outputs"]
        for a, b in zip(expected, got, strict=True):
            assert np.abs(a - b).max() <= 2, request
        assert response["metrics"]["seed"] == request["seed"]
        assert response["metrics"]["queue_time"] >= 0 and response["metrics"]["batch_size"] >= request["num_outputs"]
    # Different prompts made different images: no request got another's.
    firsts = [got[0] for got in alone]
    assert all(np.abs(firsts[0] - other).max() > 2 for other in firsts[1:])


def test_a_canceled_request_leaves_the_others_untouched(server):
    others = [dict(prompt=f"a boat {i}", seed=200 + i, **SMALL) for i in range(3)]
    expected = [pixels(server.predict(**request)) for request in others]
    results: dict = {}
    holder, doomed = _hold_the_worker(server, results)
    since = server.log_size()
    with ThreadPoolExecutor(max_workers=len(others)) as pool:
        pending = [pool.submit(lambda request: server.predict_retrying(**request), request) for request in others]
        server.wait_for_log([_logged(request) for request in others], since)
        assert server.cancel(doomed) == 200
        answers = [future.result() for future in pending]
    holder.join(timeout=60)
    assert results["held"]["status"] == "canceled"
    for want, answer in zip(expected, answers, strict=True):
        for a, b in zip(want, pixels(answer), strict=True):
            assert np.abs(a - b).max() <= 2
    assert server.is_ready_again()
    assert server.predict(prompt="after", seed=5, width=64, height=64)["status"] == "succeeded"
