"""CUDA-graph capture of one decode step, shared by the torch and TensorRT engines.

At batch 1 a decode step is hundreds of small kernels; launching them one by one from Python costs more than the
kernels themselves, so a step is captured once into a ``torch.cuda.CUDAGraph`` and replayed per token. A graph
replays fixed kernels on fixed addresses: the caller keeps every input and output in *static* buffers (the KV cache
included), copies the step's inputs into them before :meth:`StepGraphs.replay`, and re-captures when a shape changes.

* :class:`StepGraphs` -- the per-engine policy: the first step at a new shape runs eagerly on a side stream (the
  warm-up the PyTorch docs ask for: lazy cuBLAS / workspace / extension initialisation happens outside the capture),
  the next one is captured and replayed, later ones replay. A capture that fails switches graphs off for the engine
  with one logged warning; the step then runs eagerly (a capture executes nothing, so no state was changed).
* :class:`TorchGraphs` -- the real capture (``torch.cuda.graph``, a private memory pool per graph);
  tests inject a fake with the same two methods to check the control flow on a machine without CUDA.
* :class:`SlotPool` -- static buffers (and their graphs) are reused across generations: a slot is free again once
  the generation state that holds it is gone (weak reference).
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Hashable

log = logging.getLogger("rocket_deploy.runtime.cuda_graphs")


class TorchGraphs:
    """Capture with ``torch.cuda.CUDAGraph`` (replay: ``graph.replay()`` on the current stream)."""

    def __init__(self, device):
        import torch  # noqa: PLC0415
        self._torch, self.device = torch, torch.device(device)
        self._side = None

    def side_stream(self):
        if self._side is None:
            self._side = self._torch.cuda.Stream(device=self.device)
        return self._side

    def eager(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the side stream (warm-up), ordered after and before the current stream's work."""
        torch = self._torch
        cur, side = torch.cuda.current_stream(self.device), self.side_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            out = fn()
        cur.wait_stream(side)
        return out

    def capture(self, fn: Callable[[], Any]):
        torch = self._torch
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # a private memory pool per graph: graphs of different slots replay interleaved, in no fixed order
        with torch.cuda.device(self.device), torch.cuda.graph(graph):
            out = fn()
        return graph, out          # the outputs stay referenced: their pool memory is never handed to another graph

    def replay(self, captured) -> None:
        captured[0].replay()


class StepGraphs:
    """When to warm up, capture, replay or stay eager (see the module doc). ``backend`` is :class:`TorchGraphs` or a
    test fake; ``enabled`` False runs every step eagerly on the current stream."""

    def __init__(self, backend, enabled: bool, what: str = "decode step"):
        self.backend, self.enabled, self.what = backend, bool(enabled) and backend is not None, what
        self.off_reason: str | None = None if self.enabled else "off"
        self.stats = {"captures": 0, "replays": 0, "eager_steps": 0, "capture_failures": 0}

    def step(self, holder: Any, key: Hashable, fn: Callable[[], Any]) -> None:
        """Run one step of ``holder`` (an object with ``graph`` and ``graph_key`` attributes) through ``fn``, which
        reads and writes only static buffers. ``key`` names the shapes ``fn`` runs at: a new key re-captures."""
        if not self.enabled:
            self.stats["eager_steps"] += 1
            fn()
            return
        if getattr(holder, "graph_key", None) != key:
            holder.graph, holder.graph_key, holder.warm = None, key, False
        if holder.graph is None:
            if not holder.warm:                       # first step at this shape: warm-up, eagerly
                self.stats["eager_steps"] += 1
                self.backend.eager(fn)
                holder.warm = True
                return
            try:
                holder.graph = self.backend.capture(fn)
                self.stats["captures"] += 1
            except Exception as e:  # noqa: BLE001 -- any capture failure: log once, then eager for good
                self.stats["capture_failures"] += 1
                self.disable(f"{type(e).__name__}: {e}")
                fn()
                return
        self.backend.replay(holder.graph)
        self.stats["replays"] += 1

    def disable(self, reason: str) -> None:
        if self.enabled:
            log.warning("CUDA graph capture of the %s failed (%s); running it without CUDA graphs from now on "
                        "(switch them off with --no-cuda-graphs / cuda_graphs=False)", self.what, reason)
        self.enabled, self.off_reason = False, reason


class SlotPool:
    """Reusable static-buffer slots keyed by shape (batch, ...). A slot is busy while its owner object lives."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self._slots: list[tuple[Hashable, Any, Any]] = []   # (key, slot, weakref to owner or None)

    def __len__(self) -> int:
        return len(self._slots)

    def acquire(self, key: Hashable, owner: Any, make: Callable[[], Any], fits: Callable[[Any], bool] | None = None,
                size: Callable[[Any], int] | None = None):
        """A free slot of ``key`` that ``fits`` (the smallest by ``size``; else a new one from ``make()``; None when
        ``max_slots`` are all busy), now held by ``owner``. A free slot of another key is dropped to make room."""
        free = [i for i, (k, slot, ref) in enumerate(self._slots)
                if k == key and (ref is None or ref() is None) and (fits is None or fits(slot))]
        if free:
            i = min(free, key=lambda j: size(self._slots[j][1]) if size else 0)
            k, slot, _ = self._slots[i]
            self._slots[i] = (k, slot, weakref.ref(owner))
            return slot
        if len(self._slots) >= self.max_slots:
            idle = [i for i, (_, _, ref) in enumerate(self._slots) if ref is None or ref() is None]
            if not idle:
                return None
            del self._slots[idle[0]]
        slot = make()
        self._slots.append((key, slot, weakref.ref(owner)))
        return slot

    def replace(self, old: Any, new: Any) -> None:
        """``new`` takes the place (and owner) of ``old`` (a slot grown to a longer cache)."""
        for i, (k, slot, ref) in enumerate(self._slots):
            if slot is old:
                self._slots[i] = (k, new, ref)
                return

    def release(self, slot: Any) -> None:
        """``slot`` is free again (its owner moved to another one)."""
        for i, (k, s, _) in enumerate(self._slots):
            if s is slot:
                self._slots[i] = (k, s, None)
                return

    def clear(self) -> None:
        self._slots.clear()
