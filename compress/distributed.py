"""Several processes profiling one model: the plumbing over ``torch.distributed`` (launched by ``torchrun``).

``world()`` is the single process (rank 0 of 1, nothing initialised) unless the environment says otherwise:
under ``torchrun`` (``WORLD_SIZE`` > 1, with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``) the
first call joins the process group -- backend ``nccl`` when every local rank has a CUDA device, else ``gloo``
(``ROCKET_DIST_BACKEND`` overrides). A process group the caller initialised itself is used as it is.

The collectives carry Python objects (pickled; tensors inside them travel on the CPU side), which is all that
profiling needs: the whitening factors of a block, the finished layer profiles. See docs/architecture.md,
"Distributed profiling".
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import tempfile
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _backend() -> str:
    forced = os.environ.get("ROCKET_DIST_BACKEND")
    if forced:
        return forced
    import torch
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"


def _destroy() -> None:
    import torch.distributed as dist
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:       # peers already gone at interpreter exit: nothing left to release
        pass


def world() -> World:
    """This process's rank and the number of processes (joins the torchrun process group on first use)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if _env_size() <= 1:
        return World(0, 1, 0)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = _backend()
    if backend == "nccl":
        import torch
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    atexit.register(_destroy)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def assign(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each item: longest first, each to the least-loaded rank (ties: the lower rank, then the
    earlier item). Deterministic, so every rank computes the same assignment without communicating."""
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (the object itself when there is one process)."""
    w = world()
    if w.size == 1:
        return obj
    import torch.distributed as dist
    box = [obj if w.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    w = world()
    if w.size == 1:
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world().size > 1:
        import torch.distributed as dist
        dist.barrier()


def shared_temp_dir(prefix: str) -> str:
    """A new temporary directory made by rank 0, the same path on every rank. The ranks must share that
    filesystem (one machine); across machines pass a directory on a shared filesystem instead."""
    w = world()
    path = tempfile.mkdtemp(prefix=prefix) if w.main else None
    path = broadcast(path)
    os.makedirs(path, exist_ok=True)
    return path
