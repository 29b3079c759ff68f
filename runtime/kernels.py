"""Access to the compiled CUDA kernels for the sparse V product (torch extension built from plugins_trt/kernels).

``available()`` is False on machines without CUDA or without a compiler; callers then fall back to torch ops.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _load():
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        from .kernel_ext import load_extension
    except ImportError:
        return None
    try:
        return load_extension()
    except Exception:  # noqa: BLE001 -- an unbuildable extension means "not available"; doctor reports why
        return None


def available() -> bool:
    return _load() is not None


def sparse_v_matmul(t, values, mask, rank: int):
    ext = _load()
    if ext is None:
        raise RuntimeError("the rocket CUDA kernels are not available here; run `rocket-deploy doctor`")
    return ext.sparse_v_matmul(t, values, mask, rank)
