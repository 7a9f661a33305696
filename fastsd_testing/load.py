"""Many clients against one Cog server: the load of scripts/benchmark.py --load and scripts/soak.py.

Each client sends its next request as soon as the previous reply arrives. A 409 (no free slot) is
counted and, when retry_busy, sent again after retry_after_s, as a client would.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .cog_server import CogServer


@dataclass
class Outcome:
    index: int
    inputs: dict
    status: str  # succeeded, failed, canceled, or the HTTP status of a refusal
    seconds: float
    metrics: dict
    error: str | None
    images: int


@dataclass
class Load:
    outcomes: list[Outcome]
    wall_seconds: float
    refused: int  # 409 answers, retried or not

    def summary(self) -> dict:
        succeeded = [o for o in self.outcomes if o.status == "succeeded"]
        latencies = sorted(o.seconds for o in succeeded)

        def percentile(p: float) -> float:
            if not latencies:
                return float("nan")
            return latencies[min(len(latencies) - 1, round(p / 100 * (len(latencies) - 1)))]

        images = sum(o.images for o in succeeded)
        return {
            "requests": len(self.outcomes),
            "succeeded": len(succeeded),
            "failed": Counter(o.status for o in self.outcomes if o.status != "succeeded"),
            "refused_409": self.refused,
            "images": images,
            "images_per_s": round(images / self.wall_seconds, 3) if self.wall_seconds else 0.0,
            "latency_s": {
                "p50": round(percentile(50), 4),
                "p95": round(percentile(95), 4),
                "p99": round(percentile(99), 4),
                "mean": round(statistics.fmean(latencies), 4) if latencies else float("nan"),
            },
            "batch_sizes": dict(sorted(Counter(o.metrics.get("batch_size", 0) for o in succeeded).items())),
            "wall_s": round(self.wall_seconds, 2),
        }


def run_clients(
    server: CogServer,
    clients: int,
    requests: int,
    make_inputs: Callable[[int], dict],
    retry_busy: bool = True,
    retry_after_s: float = 0.005,
) -> Load:
    lock = threading.Lock()
    next_index = [0]
    outcomes: list[Outcome] = []
    refused = [0]

    def client() -> None:
        while True:
            with lock:
                index = next_index[0]
                if index >= requests:
                    return
                next_index[0] += 1
            inputs = make_inputs(index)
            started = time.perf_counter()
            while True:
                status, body = server.post(inputs)
                if status != 409:
                    break
                with lock:
                    refused[0] += 1
                if not retry_busy:
                    break
                time.sleep(retry_after_s)
            state = body.get("status", str(status)) if status == 200 else str(status)
            outcome = Outcome(
                index,
                inputs,
                state,
                time.perf_counter() - started,
                body.get("metrics") or {},
                body.get("error"),
                len(body.get("output") or []) if state == "succeeded" else 0,
            )
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Load(sorted(outcomes, key=lambda o: o.index), time.perf_counter() - started, refused[0])
