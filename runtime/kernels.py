"""Access to the compiled CUDA kernels for the sparse V product (torch extension built from plugins_trt/kernels).

``available()`` is False on machines without CUDA or without a compiler; callers then fall back to torch ops, and
``why_unavailable()`` says why (for ``rocket-deploy doctor``).
"""
from __future__ import annotations

import functools

_LOAD_ERROR: str | None = None


@functools.lru_cache(maxsize=1)
def _load():
    global _LOAD_ERROR
    import torch
    if not torch.cuda.is_available():
        _LOAD_ERROR = ("no CUDA GPU visible to torch" if torch.version.cuda is not None
                       else f"torch {torch.__version__} is a CPU-only build")
        return None
    try:
        from .kernel_ext import load_extension
    except ImportError as e:
        _LOAD_ERROR = f"the extension loader is missing: {e}"
        return None
    try:
        return load_extension()
    except Exception as e:  # noqa: BLE001 -- an unbuildable extension means "not available"; doctor reports why
        _LOAD_ERROR = str(e)
        return None


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str | None:
    """None when the kernels are available, else the reason (no CUDA, no nvcc, build error ...)."""
    return None if available() else (_LOAD_ERROR or "unknown reason")


def sparse_v_matmul(t, values, mask, rank: int, scales=None, path: int = 0):
    """``t [..., rank] @ V`` with V packed as ``values [d_out, keep]`` + ``mask uint8 [d_out, ceil(rank/8)]``.

    ``values`` in t's dtype, or int8 / float8_e4m3fn with ``scales`` (float32 ``[d_out]``). ``path``: 0 auto,
    1 decode kernel, 2 prefill (expand + GEMM) -- for tests and benchmarks.
    """
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the rocket CUDA kernels are not available here ({why_unavailable()}); "
                           f"run `rocket-deploy doctor`")
    return ext.sparse_v_matmul(t, values, mask, rank, scales, path)


def _rocket_linear_kernel(t, values, mask, rank: int):
    """The slot function for :func:`rocket_deploy.rocket_linear.register_cuda_kernel`: the compiled product when
    the kernels can be had (looked for on the first CUDA forward only), else None (RocketLinear expands V)."""
    return sparse_v_matmul(t, values, mask, rank) if available() else None


def enable() -> None:
    """Let every :class:`~rocket_deploy.rocket_linear.RocketLinear` use these kernels on CUDA tensors. Cheap: the
    extension is built / loaded lazily on the first CUDA forward, never on CPU."""
    from rocket_deploy.rocket_linear import register_cuda_kernel
    register_cuda_kernel(_rocket_linear_kernel)
