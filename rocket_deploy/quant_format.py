"""The quantized weight formats every stage reads and writes, and their byte accounting.

Compress writes them (:mod:`rocket_deploy.compress.quantize` chooses the codes), the artifact stores them,
:mod:`rocket_deploy.quant_linear` computes with them and export lowers them to ONNX; this module is the one
definition of the layout (the fp16 packed V format is :mod:`rocket_deploy.sparse_format`).

Matrices use the ``y = x M`` convention: ``M`` is ``K x N`` (``K`` inputs, ``N`` outputs).

Storage forms (what :mod:`rocket_deploy.quant_linear` and the artifact hold):

* ``int8``: ``q int8 [K, N]``, ``scales float32 [N]``; ``M = q * scales`` (symmetric, codes -127..127).
* ``fp8``:  ``q float8_e4m3fn [K, N]``, ``scales float32 [N]``; ``M = q * scales`` (|q| <= 448).
* ``int4``: the ONNX Runtime ``MatMulNBits`` layout with ``block_size = group``: ``q uint8 [N, nb, group/2]``
  (``nb = ceil(K/group)``; two codes per byte, the lower K index in the low nibble; ``K`` padded with zeros to
  ``nb*group``), ``scales float16 [N, nb]``, ``zeros uint8 [N, ceil(nb/2)]`` (zero points, two per byte, low
  nibble first); ``M[k, n] = (code - zero) * scale`` -- asymmetric unsigned 4-bit codes 0..15.
"""
from __future__ import annotations

import torch

from rocket_deploy.config import QUANT_SCHEMES as SCHEMES   # one list: the config validates against it
from rocket_deploy.sparse_format import factor_bytes

INT8_MAX = 127.0
FP8_MAX = 448.0
INT4_LEVELS = 15
DEFAULT_GROUP = 128
SCALE_BYTES = 4           # per-column scales: float32
GROUP_SCALE_BYTES = 2     # int4 group scales: float16 (MatMulNBits takes fp16 or fp32 scales)
FP16_TINY = 2.0 ** -14    # smallest normal fp16: int4 scales are kept at or above it


def u_format(scheme: str) -> str:
    """Format of U (and of a dense quantized weight) under ``scheme``."""
    check_scheme(scheme)
    return scheme


def v_format(scheme: str) -> str:
    """Format of V's packed values: int8 for ``int4`` (4-bit values next to an 8-bit-per-column bitmask and
    per-column scales gain little and cost accuracy), else the scheme itself."""
    check_scheme(scheme)
    return "int8" if scheme == "int4" else scheme


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {scheme!r}")


# ----------------------------------------------------------------------------------------------- byte accounting
def n_groups(k: int, group: int) -> int:
    return (k + group - 1) // group


def matrix_bytes(k: int, n: int, fmt: str, group: int = DEFAULT_GROUP) -> int:
    """Stored bytes of a ``K x N`` matrix in ``fmt`` including scales (and int4 padding and zero points)."""
    if fmt in ("int8", "fp8"):
        return k * n + SCALE_BYTES * n
    if fmt == "int4":
        nb = n_groups(k, group)
        return n * nb * (group // 2) + GROUP_SCALE_BYTES * n * nb + n * ((nb + 1) // 2)
    raise ValueError(f"unknown format {fmt!r}")


def quant_factor_bytes(d_in: int, d_out: int, rank: int, keep: int, scheme: str, group: int = DEFAULT_GROUP) -> int:
    """Deployed bytes of a quantized ROCKET layer: U in ``u_format`` + V (bitmask when k < r, 1-byte values,
    one float32 scale per output column)."""
    uf = u_format(scheme)
    u = matrix_bytes(d_in, rank, uf, group)
    v_scales = SCALE_BYTES * d_out
    # factor_bytes counts U at u_elem_bytes per element and V at 1 byte per value (+ mask when k < r)
    return factor_bytes(d_in, d_out, rank, keep, u_elem_bytes=0, v_elem_bytes=1, extra_bytes=u + v_scales)


def quant_dense_bytes(d_in: int, d_out: int, scheme: str, group: int = DEFAULT_GROUP) -> int:
    """Bytes of a dense ``d_in x d_out`` weight quantized under ``scheme`` (per output channel / group-wise)."""
    return matrix_bytes(d_in, d_out, u_format(scheme), group)


def bytes_fn(scheme: str | None, group: int = DEFAULT_GROUP):
    """A ``bytes_fn(d_in, d_out, rank, keep)`` for :func:`compress.candidates.candidate_grid` / ``fit_rank``."""
    if scheme is None:
        return factor_bytes
    check_scheme(scheme)

    def fn(d_in, d_out, rank, keep):
        return quant_factor_bytes(d_in, d_out, rank, keep, scheme, group)
    return fn


# ------------------------------------------------------------------------------------------------ dequantization
def dequant_cols(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q [K, N] * scales [N]`` in ``dtype``."""
    return q.to(dtype) * scales.to(dtype)[None, :]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 2m]`` codes 0..15 -> ``uint8 [..., m]``, element ``2i`` in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError("pack_nibbles needs an even last dimension")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequant_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[K, N]`` matrix from the MatMulNBits-layout storage of :func:`quantize_int4`."""
    n, nb, _ = packed.shape
    codes = unpack_nibbles(packed).to(dtype)                        # [N, nb, group]
    zero = unpack_nibbles(zeros)[:, :nb].to(dtype)                  # [N, nb]
    w = (codes - zero[:, :, None]) * scales.to(dtype)[:, :, None]
    return w.reshape(n, -1)[:, :k].t().contiguous()


def dequant_matrix(fmt: str, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, k: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if fmt == "int4":
        return dequant_int4(q, scales, zeros, k, dtype)
    return dequant_cols(q, scales, dtype)
