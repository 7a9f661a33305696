"""The Cog floor: a predictor that returns a fixed JPEG, served by the same Cog server as predict.py
(its declared slots, the same async run()), so that a client measures what the server alone costs
per request, and fastsd's own share is the rest (scripts/graphs_benchmark.py, --floor).

It takes the inputs a default request sends and answers num_outputs copies of one 512x512 JPEG,
each written to a file of its own as fastsd writes its outputs.
"""

import io
import tempfile
from pathlib import Path as FilePath

import cog
import numpy as np
from cog import BaseRunner, Input, Path
from PIL import Image


class FloorPredictor(BaseRunner):
    def setup(self) -> None:
        ramp = np.linspace(0, 255, 512, dtype=np.float32)
        pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (512, 1)), np.tile(ramp[:, None], (1, 512))], -1)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=80)
        self.jpeg = buffer.getvalue()
        self.folder = FilePath(tempfile.mkdtemp(prefix="cog-floor-"))
        self.count = 0

    @cog.concurrent(max=16)
    async def run(
        self,
        prompt: str = Input(description="Ignored."),
        seed: int | None = Input(default=None, description="Ignored."),
        width: int | None = Input(default=None, description="Ignored."),
        height: int | None = Input(default=None, description="Ignored."),
        num_outputs: int = Input(default=1, ge=1, le=8, description="How many copies of the JPEG."),
        vae: str | None = Input(default=None, description="Ignored."),
        output_format: str = Input(default="jpg", description="Ignored: always JPEG."),
    ) -> list[Path]:
        self.record_metric("inference_time", 0.0)
        self.record_metric("batch_size", num_outputs)
        paths = []
        for _ in range(num_outputs):
            self.count += 1
            path = self.folder / f"output-{self.count}.jpg"
            path.write_bytes(self.jpeg)
            paths.append(Path(path))
        return paths
