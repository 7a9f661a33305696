"""Serving concurrent requests: one worker runs the model, and requests that arrive while it is
busy wait in a queue; those that can share a pipeline call (engine.batch_key: same task, size,
steps, guidance, vae) run together, up to the variant's batch budget.

A request never waits for a batch to fill: the moment the worker is free it takes the oldest
request and whatever compatible requests are queued behind it. The batch is fixed when its call
starts. A request canceled while queued leaves the queue; one canceled while its call runs gets
no result and changes nothing for the others; a call whose requests are all canceled stops at the
end of the current step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Engine, Interrupted, Result, batch_key
from .inputs import GenerationRequest

log = logging.getLogger(__name__)


class Canceled(Exception):
    """The request was canceled before its images were made."""


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = field(default_factory=time.perf_counter)
    canceled: bool = False

    @property
    def images(self) -> int:
        return self.request.num_outputs

    @property
    def pixels(self) -> int:
        return self.request.num_outputs * self.request.width * self.request.height


class Batcher:
    def __init__(self, engine: Engine):
        self.engine = engine
        variant = engine.variant
        self.max_images, self.max_pixels = variant.max_batch_images, variant.max_batch_pixels
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._ready = threading.Condition()
        # Told of every call (fastsd.metrics): its requests' queue times, images, seconds and outcome.
        self.on_call: Callable[[list[float], int, float, str], None] | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="fastsd-batcher", daemon=True)
        self._worker.start()

    # --- the callers' side ---

    def submit(self, request: GenerationRequest) -> Job:
        job = Job(request)
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._ready.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self._ready:
            job.canceled = True
            if job in self._queue:
                self._queue.remove(job)
        job.future.cancel()  # only works while it has not started; a running job is dropped at the end

    async def run(self, request: GenerationRequest) -> Result:
        """Submit and wait, from an event loop; a canceled wait cancels the request."""
        job = self.submit(request)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

    def queued(self) -> int:
        return len(self._queue)

    def running(self) -> int:
        return len(self._running)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._worker.join(timeout=60)

    # --- the worker ---

    def _next_batch(self) -> list[Job] | None:
        """The oldest request and the queued requests that can share its call, within the budget."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            batch: list[Job] = []
            images = pixels = 0
            key = batch_key(self._queue[0].request)
            for job in list(self._queue):
                if batch and (
                    batch_key(job.request) != key
                    or images + job.images > self.max_images
                    or pixels + job.pixels > self.max_pixels
                ):
                    continue
                self._queue.remove(job)
                if not job.future.set_running_or_notify_cancel():
                    continue  # canceled while queued
                batch.append(job)
                images, pixels = images + job.images, pixels + job.pixels
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)
            # Idle: the engine's work between requests (a graph for a size seen repeatedly), one
            # piece at a time, looking at the queue again after each.
            while self._idle() and self.engine.between_requests():
                pass

    def _idle(self) -> bool:
        with self._ready:
            return not self._queue and not self._closed

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        self._running = batch
        outcome = "failed"
        try:
            results = self.engine.generate_batch(
                [job.request for job in batch], interrupted=lambda: all(job.canceled for job in batch)
            )
            outcome = "succeeded"
        except Interrupted:
            outcome = "canceled"
            for job in batch:
                job.future.set_exception(Canceled())
            return
        except Exception as error:  # noqa: BLE001 - it goes to the request(s) that caused it
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            # One request's trouble (memory for the whole batch, say) must not fail the others:
            # each runs again on its own.
            log.warning("a batch of %d requests failed (%s): running them one by one", len(batch), error)
            for job in batch:
                if job.canceled:
                    job.future.set_exception(Canceled())
                else:
                    self._run([job])
            outcome = "retried"  # each request's own call was counted
            return
        finally:
            self._running = []
            if self.on_call is not None and outcome != "retried":
                waits = [started - job.submitted for job in batch]
                self.on_call(waits, sum(job.images for job in batch), time.perf_counter() - started, outcome)
        for job, result in zip(batch, results, strict=True):
            result.timings["queue_time"] = started - job.submitted
            if job.canceled:
                job.future.set_exception(Canceled())
            else:
                job.future.set_result(result)
