"""The loop around the graphs: per-call Python work of diffusers' pipeline call that a profile shows
and that cannot change between calls, done once.

A profile showed it (docs/performance.md has the figures): the pipeline's `_execution_device`
walks every module of every component on each call, looking for offloading hooks, then asks
`device`, which reads the pipeline's signature; the cost grows with the number of modules. fastsd
never offloads: every component lives on the one device the pipelines were moved to, so both
answers are fixed at setup.
"""

from __future__ import annotations

import torch

_PINNED: dict[tuple[type, str], type] = {}


def pin_device(pipeline, device: str) -> None:
    """Make the pipeline's device and execution device constants (its class, with two properties
    answered at once; everything else, the name included, is the original class's)."""
    original = getattr(type(pipeline), "_fastsd_original", type(pipeline))
    key = (original, device)
    if key not in _PINNED:
        fixed = torch.device(device)
        _PINNED[key] = type(
            original.__name__,
            (original,),
            {
                "__module__": original.__module__,
                "_fastsd_original": original,
                "device": property(lambda self: fixed),
                "_execution_device": property(lambda self: fixed),
            },
        )
    pipeline.__class__ = _PINNED[key]
