"""A request's images as files: encoded in parallel into a folder of the request's own.

Cog reads a request's files after run() returns, while other requests go on, so each request gets
its own folder; the oldest folders go once there are several times the slots' worth, the whole
tree at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import images
from .errors import ContentWithheld
from .gpu import postprocess
from .inputs import MAX_OUTPUTS, GenerationRequest
from .results import Result

KEPT_FOLDERS = 64  # several times the slots: Cog has read a request's files long before


class Outputs:
    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="fastsd-outputs-"))
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self._root, ignore_errors=True)
        # Pillow's encoders release the GIL: a batch encodes in parallel on the host's cores.
        self._encoders = ThreadPoolExecutor(max_workers=min(MAX_OUTPUTS, os.cpu_count() or 1))

    def _folder(self) -> Path:
        folder = Path(tempfile.mkdtemp(dir=self._root))
        with self._lock:
            self._folders.append(folder)
            stale = [self._folders.popleft() for _ in range(len(self._folders) - KEPT_FOLDERS)]
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def save(self, result: Result, request: GenerationRequest) -> list[Path]:
        """Encode the images into a folder of this request's own. A request whose every image the
        safety checker withheld fails here, saying so."""
        if result.withheld and not result.images:
            count = "the image" if result.withheld == 1 else f"all {result.withheld} images"
            raise ContentWithheld(
                f"The safety checker withheld {count} of this request as NSFW; try another prompt or seed."
            )
        started = time.perf_counter()
        folder = self._folder()
        targets = [folder / f"output-{i}.{request.output_format}" for i in range(len(result.images))]
        if result.on_device is not None and request.output_format == "jpg":  # nvJPEG, on the GPU
            for target, data in zip(targets, postprocess.encode_jpeg(result.on_device, request.output_quality),
                                    strict=True):  # fmt: skip
                target.write_bytes(data)
            paths = targets
        else:
            paths = list(
                self._encoders.map(
                    lambda pair: images.save(pair[0], pair[1], request.output_format, request.output_quality),
                    zip(result.images, targets, strict=True),
                )
            )
        result.timings["encode_time"] = time.perf_counter() - started
        return paths
