"""Captured CUDA graphs for the modules on the hot path: the one module that knows about graphs.

A module's forward is replaced by a GraphedModule. Each call is keyed by its inputs' structure,
shapes and dtypes (and the values of its non-tensor arguments); a key with a graph replays it: the
inputs are copied into the graph's static tensors, one launch runs every kernel, the outputs are
copied out (all graphs of a device share one memory pool, so a later replay reuses the memory an
earlier graph's outputs were in). A key without one runs the module eagerly, unless a batch of
the same shapes was captured at a larger batch size: then the inputs are padded to it (the last
item repeated) and the outputs cut back, which leaves every real item what it would have been
(each item of these modules is computed on its own). What gets captured, and when, is the plan's
business (fastsd.gpu.plan).

Where CUDA is absent (CPU tests) the same code runs with an eager stand-in: "capturing" calls the
module once on the static tensors, "replaying" calls it again on them. Everything but the
cudaGraphLaunch is exercised: the keys, the static inputs, padding, the outputs read out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

BATCH = -1  # the batch dimension in a family's shapes


@dataclass(frozen=True)
class Signature:
    """A call's key: its family (input structure, shapes with the batch marked, dtypes, the
    non-tensor values) and its batch size. Graphs of one family differ only in the batch."""

    family: tuple
    batch: int | None  # None: no batch dimension to pad (the first tensor is a scalar)

    def example_inputs(self, device: torch.device | str) -> tuple[tuple, dict]:
        """Zero tensors of this signature's shapes (a graph's kernels do not depend on values)."""
        spec, leaves = self.family
        made = []
        for leaf in leaves:
            if leaf[0] == "tensor":
                _, shape, dtype, on = leaf
                shape = tuple(self.batch if size == BATCH else size for size in shape)
                made.append(torch.zeros(shape, dtype=dtype, device=device if on != "cpu" else "cpu"))
            else:
                made.append(leaf[1])
        return pytree.tree_unflatten(made, spec)

    def describe(self) -> str:
        shapes = ["x".join(str(self.batch if s == BATCH else s) for s in leaf[1]) or "scalar"
                  for leaf in self.family[1] if leaf[0] == "tensor"]  # fmt: skip
        return ", ".join(shapes)


def signature_of(leaves: list, spec) -> Signature | None:
    """The key of a call's flattened inputs, or None when a non-tensor input cannot be a key part."""
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if not tensors:
        return None
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    described: list[tuple] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            shape = tuple(leaf.shape)
            if batch is not None and shape and shape[0] == batch:
                shape = (BATCH, *shape[1:])
            described.append(("tensor", shape, leaf.dtype, leaf.device.type))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            described.append(("value", leaf))
    return Signature((spec, tuple(described)), batch)


def _pad(tensor: torch.Tensor, batch: int, to: int) -> torch.Tensor:
    if to == batch:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(to - batch, *tensor.shape[1:])])


class Executor:
    """Where a device's graphs are made: one memory pool, one capture stream, one lock.

    The lock serialises captures and replays: graphs sharing a pool must not run at once, and a
    capture must not see another thread's kernels.
    """

    def __init__(self, device: str):
        self.device = device
        self.cuda = device == "cuda"
        self.lock = threading.RLock()
        self.pool = torch.cuda.graph_pool_handle() if self.cuda else None
        self.stream = torch.cuda.Stream() if self.cuda else None
        self.enabled = True  # False: every call eager (a request with a user's LoRA, a benchmark's eager side)

    def memory_free_fraction(self) -> float | None:
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return free / total


class Graph:
    """One captured call: static inputs copied into, outputs read out of."""

    def __init__(self, forward: Callable, signature: Signature, leaves: list, spec, executor: Executor):
        self._executor = executor
        self._forward = forward
        self._spec = spec
        self._positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self._leaves = list(leaves)
        for position in self._positions:
            self._leaves[position] = leaves[position].detach().clone()
        self.signature = signature
        started = time.perf_counter()
        args, kwargs = pytree.tree_unflatten(self._leaves, spec)
        if executor.cuda:
            assert executor.stream is not None  # made with the executor, on CUDA
            # Warm up outside the capture: lazy initialisation, cuDNN and cuBLAS plans, on the side
            # stream the capture uses.
            executor.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(executor.stream):
                forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(executor.stream)
            self._graph: torch.cuda.CUDAGraph | None = torch.cuda.CUDAGraph()
            # thread_local: the server's other threads (encoding the last request's outputs) may use
            # CUDA meanwhile; only this thread's calls are checked for what a capture forbids.
            with torch.cuda.graph(
                self._graph, pool=executor.pool, stream=executor.stream, capture_error_mode="thread_local"
            ):
                outputs = forward(*args, **kwargs)
        else:
            self._graph = None
            outputs = forward(*args, **kwargs)
        self._outputs, self._output_spec = pytree.tree_flatten(outputs)
        self.capture_s = time.perf_counter() - started

    def run(self, leaves: list) -> list:
        for position in self._positions:
            self._leaves[position].copy_(leaves[position])
        if self._graph is not None:
            self._graph.replay()
        else:  # the stand-in: the same static tensors, run eagerly
            args, kwargs = pytree.tree_unflatten(self._leaves, self._spec)
            self._outputs = pytree.tree_flatten(self._forward(*args, **kwargs))[0]
        return [output.clone() if isinstance(output, torch.Tensor) else output for output in self._outputs]

    @property
    def output_spec(self):
        return self._output_spec


class GraphedModule:
    """Installed as module.forward: a call with a graph (or a larger captured batch) replays it,
    any other call runs the module's own forward."""

    def __init__(self, name: str, module: torch.nn.Module, executor: Executor, plan):
        self.name = name
        self.module = module
        self.executor = executor
        self.plan = plan
        self.eager = module.forward
        self.graphs: dict[tuple, dict[int | None, Graph]] = {}
        self.failed: set[tuple] = set()  # families whose capture failed: eager for good
        self.broken: str | None = None  # a module that cannot be captured at all (a host sync inside)
        self.replays = self.eager_calls = 0  # counted, for the tests and the benchmark's log
        self._weights = self._weights_token()
        module.forward = self

    def _weights_token(self) -> tuple | None:
        # A module moved or cast (a VAE upcast to fp32 for one call) has new weight tensors: the
        # graphs would read the old ones.
        first = next(self.module.parameters(), None)
        return None if first is None else (first.data_ptr(), first.dtype)

    def uninstall(self) -> None:
        self.module.__dict__.pop("forward", None)

    def captured(self) -> list[Signature]:
        return [graph.signature for by_batch in self.graphs.values() for graph in by_batch.values()]

    def __call__(self, *args, **kwargs):
        graph = None
        if self.executor.enabled and self.broken is None and not torch.is_grad_enabled():
            leaves, spec = pytree.tree_flatten((args, kwargs))
            signature = signature_of(leaves, spec)
            if signature is not None and signature.family not in self.failed and self._weights_current():
                graph = self._find(signature)
                if graph is None and self.plan.capturing:
                    graph = self.capture(signature, leaves, spec)
                if graph is None:
                    self.plan.saw(self, signature)
        if graph is None:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        self.replays += 1
        assert signature is not None  # a graph was found for it
        return self._replay(graph, signature, leaves)

    def _weights_current(self) -> bool:
        """False once the weights are new tensors (a text encoder grown by a LoRA's new tokens): the
        graphs read the old ones, so they go, and the shapes are captured again as they are seen."""
        token = self._weights_token()
        if token == self._weights:
            return True
        with self.executor.lock:
            dropped = sum(len(by_batch) for by_batch in self.graphs.values())
            self.graphs.clear()
            self._weights = token
        log.info("graphs: %s has new weight tensors: its %d graph(s) dropped, captured again as seen", self.name,
                 dropped)  # fmt: skip
        return False

    def _find(self, signature: Signature) -> Graph | None:
        by_batch = self.graphs.get(signature.family)
        if not by_batch:
            return None
        if signature.batch in by_batch:
            return by_batch[signature.batch]
        if signature.batch is None:
            return None
        larger = [batch for batch in by_batch if batch is not None and batch > signature.batch]
        return by_batch[min(larger)] if larger else None

    def _replay(self, graph: Graph, signature: Signature, leaves: list):
        batch, padded = signature.batch, graph.signature.batch
        if padded != batch and batch is not None and padded is not None:
            leaves = [
                _pad(leaf, batch, padded) if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.shape[0] == batch
                else leaf
                for leaf in leaves
            ]  # fmt: skip
        with self.executor.lock:
            outputs = graph.run(leaves)
        if padded != batch and batch is not None and padded is not None:
            outputs = [
                output[:batch] if isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == padded
                else output
                for output in outputs
            ]  # fmt: skip
        return pytree.tree_unflatten(outputs, graph.output_spec)

    def capture(self, signature: Signature, leaves: list | None = None, spec=None) -> Graph | None:
        """Capture the call of this signature (from the given inputs, or zeros of its shapes)."""
        if leaves is None:
            with torch.inference_mode():
                args, kwargs = signature.example_inputs(self.executor.device)
            leaves, spec = pytree.tree_flatten((args, kwargs))
        try:
            with self.executor.lock, torch.inference_mode():
                graph = Graph(self.eager, signature, leaves, spec, self.executor)
        except torch.OutOfMemoryError:
            self.failed.add(signature.family)
            if self.executor.cuda:
                torch.cuda.empty_cache()
            log.warning("graphs: out of memory capturing %s at %s: it runs eagerly", self.name, signature.describe())
            return None
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager path, never a failed request
            self.broken = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("graphs: %s cannot be captured (%s): it runs eagerly", self.name, self.broken)
            return None
        self.graphs.setdefault(signature.family, {})[signature.batch] = graph
        log.info("graphs: captured %s at %s in %.0f ms", self.name, signature.describe(), graph.capture_s * 1000)
        return graph
