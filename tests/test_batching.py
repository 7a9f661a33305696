"""The batcher in process, on the tiny sd-turbo: which queued requests share a call, the budget,
cancellation at each stage. (tests/test_concurrency.py drives the same through the Cog server.)"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest

from fastsd.batching import Batcher, Canceled
from fastsd_testing.helpers import load_engine


@pytest.fixture(scope="module")
def engine(weights_root):
    return load_engine(weights_root, "sd-turbo")


@pytest.fixture
def batcher(engine):
    running = Batcher(engine)
    yield running
    running.close()


def request(engine, **raw):
    return engine.validate(**{"prompt": "a kite", "seed": 1, "width": 64, "height": 64, **raw})


def busy(batcher, engine):
    """A long request that keeps the worker busy while the test queues others behind it."""
    job = batcher.submit(request(engine, num_inference_steps=40, width=512, height=512, seed=99))
    deadline = time.monotonic() + 10
    while job.future.running() is False and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.future.running()
    return job


def test_queued_requests_that_can_share_a_call_run_together_and_others_wait(batcher, engine):
    blocker = busy(batcher, engine)
    same = [batcher.submit(request(engine, prompt=f"kite {i}", seed=i, num_outputs=1 + i % 2)) for i in range(3)]
    other_size = batcher.submit(request(engine, width=96))
    results = [job.future.result(timeout=120) for job in same]
    assert [r.batch_size for r in results] == [4, 4, 4]  # 1 + 2 + 1 images in one call
    assert [len(r.images) for r in results] == [1, 2, 1]
    assert other_size.future.result(timeout=120).batch_size == 1
    assert blocker.future.result(timeout=120).batch_size == 1
    assert all(r.timings["queue_time"] > 0 for r in results)


def test_a_batch_keeps_to_the_image_budget(batcher, engine):
    busy(batcher, engine)
    jobs = [batcher.submit(request(engine, seed=i)) for i in range(engine.variant.max_batch_images + 1)]
    sizes = sorted(job.future.result(timeout=120).batch_size for job in jobs)
    assert sizes == [1] + [engine.variant.max_batch_images] * engine.variant.max_batch_images


def test_each_image_of_a_batch_is_what_its_request_draws_alone(batcher, engine):
    alone = engine.generate(request(engine, prompt="a red boat", seed=7, num_outputs=2))
    busy(batcher, engine)
    jobs = [batcher.submit(request(engine, prompt=p, seed=s)) for p, s in (("x", 3), ("a red boat", 9))]
    mine = batcher.submit(request(engine, prompt="a red boat", seed=7, num_outputs=2))
    batched = mine.future.result(timeout=120)
    assert batched.batch_size == 4
    for a, b in zip(alone.images, batched.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    for job in jobs:
        job.future.result(timeout=120)


def test_a_request_canceled_in_the_queue_leaves_it_and_changes_nothing_else(batcher, engine):
    alone = engine.generate(request(engine, prompt="a green tree", seed=5))
    busy(batcher, engine)
    doomed = batcher.submit(request(engine, prompt="never", seed=4))
    kept = batcher.submit(request(engine, prompt="a green tree", seed=5))
    batcher.cancel(doomed)
    with pytest.raises((concurrent.futures.CancelledError, Canceled)):
        doomed.future.result(timeout=120)
    result = kept.future.result(timeout=120)
    assert result.batch_size == 1  # the canceled request did not join its call
    assert np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(alone.images[0], dtype=int)).max() <= 2


def test_a_running_request_canceled_alone_stops_within_a_step(batcher, engine):
    started = time.monotonic()
    busy(batcher, engine).future.result(timeout=120)
    whole = time.monotonic() - started  # 40 steps, uncanceled
    job = busy(batcher, engine)
    started = time.monotonic()
    batcher.cancel(job)
    with pytest.raises(Canceled):
        job.future.result(timeout=120)
    assert time.monotonic() - started < whole / 4
    assert batcher.submit(request(engine)).future.result(timeout=120).images  # the worker goes on


def test_the_queue_metrics_see_what_the_batcher_does(engine, batcher):
    """fastsd.metrics reads the batcher: the queue's gauges at each scrape, each call's waits and images."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fastsd.metrics import ServerMetrics

    metrics = ServerMetrics(batcher)

    def samples() -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip

    assert samples()["fastsd_queued_requests[]"] == 0
    jobs = [batcher.submit(request(engine, seed=seed, num_outputs=2)) for seed in (1, 2)]
    for job in jobs:
        job.future.result(timeout=120)
    after = samples()
    assert after["fastsd_queue_time_seconds_count[]"] == 2
    assert after["fastsd_images_total[]"] == 4
    assert after["fastsd_calls_total[('outcome', 'succeeded')]"] >= 1
    assert after["fastsd_running_requests[]"] == 0
