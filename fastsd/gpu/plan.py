"""The capture plan: which calls get graphs, and when.

- At setup, every call the served default size makes at 1, 2, 4, 8 ... images (up to the batch
  budget, which is captured too) is captured: Engine.warm_up runs those requests while capturing.
- A call with no graph of its own replays the smallest captured batch above it, padded
  (fastsd.gpu.graphs): 3 images run in the graph of 4.
- Any other call runs eagerly. A signature seen CAPTURE_AFTER times is queued, and captured
  between requests (the batch worker asks when its queue is empty, one graph at a time), within a
  bound on how many such graphs are made and how much of the device's memory stays free.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter

from .graphs import GraphedModule, Signature

log = logging.getLogger(__name__)

CAPTURE_AFTER = 3  # sightings of an uncaptured signature before it is captured between requests
MAX_BACKGROUND_GRAPHS = 24  # graphs made after setup, over all modules
MIN_FREE_MEMORY = 0.15  # of the device's memory, left free by background captures
MAX_TRACKED = 256  # distinct uncaptured signatures counted (the oldest forgotten past that)


def batch_sizes(budget: int) -> tuple[int, ...]:
    """1, 2, 4, 8 ... below the budget, and the budget itself: every batch up to it pads to one."""
    sizes, size = [], 1
    while size < budget:
        sizes.append(size)
        size *= 2
    return (*sizes, budget)


class CapturePlan:
    def __init__(
        self,
        sizes: tuple[int, ...],
        capture_after: int = CAPTURE_AFTER,
        max_background: int = MAX_BACKGROUND_GRAPHS,
        min_free_memory: float = MIN_FREE_MEMORY,
    ):
        self.sizes = sizes
        self.capture_after = capture_after
        self.max_background = max_background
        self.min_free_memory = min_free_memory
        self.capturing = False  # setup: capture every call made
        self.background_made = 0
        self._seen: Counter = Counter()
        self._pending: dict[tuple, tuple[GraphedModule, Signature]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def capturing_all(self):
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    def saw(self, graphed: GraphedModule, signature: Signature) -> None:
        """An eager call with no graph: counted, and queued once it has been seen often enough."""
        key = (graphed.name, signature)
        with self._lock:
            if key in self._pending or self.background_made + len(self._pending) >= self.max_background:
                return
            self._seen[key] += 1
            if self._seen[key] >= self.capture_after:
                del self._seen[key]
                self._pending[key] = (graphed, signature)
            elif len(self._seen) > MAX_TRACKED:
                del self._seen[next(iter(self._seen))]

    @property
    def pending(self) -> list[tuple[str, Signature]]:
        with self._lock:
            return list(self._pending)

    def capture_one(self) -> bool:
        """Capture the oldest queued signature, between requests. True when one was captured (more
        may be waiting); False when there is nothing to do or the bounds say stop."""
        with self._lock:
            if not self._pending:
                return False
            key = next(iter(self._pending))
            graphed, signature = self._pending.pop(key)
        if signature.batch in graphed.graphs.get(signature.family, {}):
            return True  # captured meanwhile
        free = graphed.executor.memory_free_fraction()
        if free is not None and free < self.min_free_memory:
            with self._lock:
                self._pending.clear()
                self.max_background = self.background_made  # no more: memory is what bounds them now
            log.info("graphs: %.0f%% of the device memory free, below %.0f%%: no more captures between requests",
                     free * 100, self.min_free_memory * 100)  # fmt: skip
            return False
        if graphed.capture(signature) is None:
            return False
        with self._lock:
            self.background_made += 1
        return True
