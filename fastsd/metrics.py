"""What an autoscaler and a dashboard read: the queue, as Prometheus metrics (prometheus_client).

FASTSD_METRICS_PORT=9100 makes the Cog worker (and python -m fastsd.realtime) serve them at
http://<pod>:9100/metrics; unset (the default), nothing listens. docs/deploy.md scales a Kubernetes
Deployment on fastsd_queue_time_seconds with them (deploy/kubernetes/).

- fastsd_queued_requests, fastsd_running_requests: requests waiting for the model, and in the call
  running now (gauges, read at each scrape);
- fastsd_queue_time_seconds: how long each request waited before its call started (histogram);
- fastsd_call_seconds, fastsd_images_total, fastsd_calls_total: each pipeline call's time, images, outcome.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Seconds: from a free worker (milliseconds) to a queue several batches deep on a slow model.
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """One server's metrics, in a registry of their own (several engines may live in one process)."""

    def __init__(self, batcher):
        self.registry = CollectorRegistry()
        queued = Gauge("fastsd_queued_requests", "Requests waiting for the model.", registry=self.registry)
        queued.set_function(batcher.queued)
        running = Gauge("fastsd_running_requests", "Requests in the pipeline call running now.", registry=self.registry)
        running.set_function(batcher.running)
        self.queue_time = Histogram(
            "fastsd_queue_time_seconds",
            "Time a request waited in fastsd's queue before its pipeline call started.",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.call_time = Histogram("fastsd_call_seconds", "Time of one pipeline call.", registry=self.registry)
        self.images = Counter("fastsd_images", "Images made (withheld ones included).", registry=self.registry)
        self.calls = Counter("fastsd_calls", "Pipeline calls by outcome.", ["outcome"], registry=self.registry)
        batcher.on_call = self.record

    def record(self, queue_times: list[float], images: int, seconds: float, outcome: str) -> None:
        """A call's requests' waits, its images and time, and how it ended (succeeded, failed, canceled)."""
        for waited in queue_times:
            self.queue_time.observe(waited)
        self.call_time.observe(seconds)
        self.calls.labels(outcome).inc()
        if outcome == "succeeded":
            self.images.inc(images)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """GET /metrics on its own port, from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics: http://%s:%d/metrics", host, port)
