"""The GPU fast path: the hot path's modules as captured CUDA graphs (graphs.py), what is captured
when (plan.py), and images kept on the device until they are encoded (postprocess.py).

One code path, two executors: the pipelines call their modules as always, and each graphed
module replays a graph where it has one and runs eagerly where it has none. FASTSD_GRAPHS=on
turns it on (on a CPU an eager stand-in runs the same code, for the tests); off, or unset, leaves
every module as it is. It becomes the CUDA default only once a GPU run has shown that its images
match the eager path's (scripts/gpu-benchmark).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .graphs import Executor, GraphedModule
from .loop import pin_device
from .plan import CapturePlan, batch_sizes

log = logging.getLogger(__name__)

GRAPHS_ENV = "FASTSD_GRAPHS"


def hot_modules(loaded) -> dict[str, torch.nn.Module]:
    """The modules a request runs, by name: text encoder(s) (so any caller of them, one 77-token
    chunk at a time, gets the graphs), UNet, ControlNets, decoders, the safety models."""
    from ..tasks import Task
    from ..variants import TINY_VAE

    main = loaded.text_to_image
    modules = {name: getattr(main, name) for name in ("text_encoder", "text_encoder_2") if getattr(main, name, None)}
    modules["unet"] = main.unet
    for (_, _, controlnet), pipeline in loaded.by_key.items():
        if controlnet:  # one ControlNet module serves every task and vae
            modules[f"controlnet_{controlnet}"] = pipeline.controlnet
    # diffusers casts an fp16 VAE marked force_upcast to fp32 around each decode: new weight tensors
    # every call, which no graph can follow.
    if not (main.vae.config.get("force_upcast") and main.vae.dtype == torch.float16):
        modules["vae_decoder"] = main.vae.decoder
    if TINY_VAE in loaded.vae_choices:
        modules["tiny_vae_decoder"] = loaded.get(Task.TEXT_TO_IMAGE, TINY_VAE).vae.decoder
    if loaded.safety is not None:
        modules.update(loaded.safety.modules())
    return modules


class Graphs:
    """One deployment's graphed modules and their plan; with none (off) every method does nothing."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: str, budget: int):
        self.plan = CapturePlan(batch_sizes(budget))
        self.executor = Executor(device)
        self.modules = {name: GraphedModule(name, module, self.executor, self.plan) for name, module in modules.items()}
        self.paused = False  # True: every call eager, the graphs kept (a benchmark's eager side)

    @classmethod
    def off(cls) -> Graphs:
        return cls({}, "cpu", 1)

    @classmethod
    def for_pipelines(cls, loaded, budget: int, compiled: bool, enabled: bool) -> Graphs:
        """The pipelines' hot modules graphed where enabled (Settings.graphs, FASTSD_GRAPHS)."""
        if not enabled:
            return cls.off()
        if compiled:
            log.info("graphs: %s=on is left to torch.compile, since FASTSD_COMPILE is set", GRAPHS_ENV)
            return cls.off()
        graphs = cls(hot_modules(loaded), loaded.device, budget)
        for pipeline in loaded.by_key.values():
            pin_device(pipeline, loaded.device)  # per-call module walks, answered once (fastsd.gpu.loop)
        kind = "CUDA graphs" if graphs.executor.cuda else "the eager stand-in (no CUDA)"
        log.info("graphs: %s for %s, batch sizes %s", kind, ", ".join(graphs.modules), graphs.plan.sizes)
        return graphs

    @property
    def active(self) -> bool:
        return bool(self.modules)

    @property
    def setup_sizes(self) -> tuple[int, ...]:
        """The images per call the warm-up makes: every captured batch size, or one image."""
        return self.plan.sizes if self.active else (1,)

    def use(self, enabled: bool) -> None:
        """Graphs for the next call, or eager (a request with a user's LoRA: its layers are not in them)."""
        self.executor.enabled = enabled and not self.paused

    def capturing(self):
        return self.plan.capturing_all() if self.active else contextlib.nullcontext()

    def between_requests(self) -> bool:
        """Capture one signature seen repeatedly; True when there may be more to do."""
        return self.plan.capture_one() if self.active else False

    def summary(self) -> dict[str, int]:
        return {name: len(graphed.captured()) for name, graphed in self.modules.items()}
