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

V's packed values (``keep`` per output column, :func:`v_format`) are stored per column: ``int8`` / ``fp8`` as
``[d_out, keep]`` codes with one float32 scale per column, or

* ``int4s`` (``quant_v_bits=4`` under ``int4``): symmetric 4-bit codes -7..7 stored offset by 8 as nibbles,
  ``uint8 [d_out, ceil(keep/2)]`` (value ``2i`` of a column in the low nibble, a zero nibble pads an odd
  ``keep``), one float32 scale per column; ``value = (nibble - 8) * scale``. Export targets and kernels that take
  1-byte values get the same codes widened to int8 (:func:`unpack_v_int4s`).
"""
from __future__ import annotations

import torch

from rocket_deploy.config import QUANT_SCHEMES as SCHEMES   # one list: the config validates against it
from rocket_deploy.sparse_format import factor_bytes

INT8_MAX = 127.0
FP8_MAX = 448.0
INT4_LEVELS = 15
INT4S_MAX = 7.0           # V values under quant_v_bits=4: symmetric codes -7..7
V_BITS = (8, 4)           # quant_v_bits choices (4: only under the int4 scheme)
DEFAULT_GROUP = 128
SCALE_BYTES = 4           # per-column scales: float32
GROUP_SCALE_BYTES = 2     # int4 group scales: float16 (MatMulNBits takes fp16 or fp32 scales)
FP16_TINY = 2.0 ** -14    # smallest normal fp16: int4 scales are kept at or above it


def u_format(scheme: str) -> str:
    """Format of U (and of a dense quantized weight) under ``scheme``."""
    check_scheme(scheme)
    return scheme


def v_format(scheme: str, v_bits: int = 8) -> str:
    """Format of V's packed values: under ``int4`` int8 by default (``v_bits=8``) or ``int4s`` (``v_bits=4``:
    symmetric 4-bit codes, one scale per column); else the scheme itself."""
    check_scheme(scheme)
    if v_bits not in V_BITS:
        raise ValueError(f"quant_v_bits must be one of {V_BITS}, got {v_bits!r}")
    if v_bits == 4:
        if scheme != "int4":
            raise ValueError(f"quant_v_bits=4 needs the int4 scheme, got {scheme!r}")
        return "int4s"
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


def v_value_bytes(keep: int, d_out: int, v_fmt: str) -> int:
    """Bytes of V's packed values (scales and mask not included)."""
    if v_fmt == "int4s":
        return d_out * ((keep + 1) // 2)
    return d_out * keep


def quant_factor_bytes(d_in: int, d_out: int, rank: int, keep: int, scheme: str, group: int = DEFAULT_GROUP,
                       v_bits: int = 8) -> int:
    """Deployed bytes of a quantized ROCKET layer: U in ``u_format`` + V (bitmask when k < r, its values in
    ``v_format(scheme, v_bits)``, one float32 scale per output column)."""
    u = matrix_bytes(d_in, rank, u_format(scheme), group)
    v_scales = SCALE_BYTES * d_out
    # factor_bytes counts U at 0 bytes here (it is in extra_bytes), V's values at 0 and the mask when k < r
    mask_only = factor_bytes(d_in, d_out, rank, keep, u_elem_bytes=0, v_elem_bytes=0)
    return mask_only + u + v_scales + v_value_bytes(keep, d_out, v_format(scheme, v_bits))


def quant_dense_bytes(d_in: int, d_out: int, scheme: str, group: int = DEFAULT_GROUP) -> int:
    """Bytes of a dense ``d_in x d_out`` weight quantized under ``scheme`` (per output channel / group-wise)."""
    return matrix_bytes(d_in, d_out, u_format(scheme), group)


def bytes_fn(scheme: str | None, group: int = DEFAULT_GROUP, v_bits: int = 8):
    """A ``bytes_fn(d_in, d_out, rank, keep)`` for :func:`compress.candidates.candidate_grid` / ``fit_rank``."""
    if scheme is None:
        return factor_bytes
    v_format(scheme, v_bits)                       # validates both

    def fn(d_in, d_out, rank, keep):
        return quant_factor_bytes(d_in, d_out, rank, keep, scheme, group, v_bits)
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


def pack_v_int4s(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes -7..7 ``[d_out, keep]`` -> ``uint8 [d_out, ceil(keep/2)]`` (offset 8, see the module doc)."""
    if codes.numel() and int(codes.abs().max()) > INT4S_MAX:
        raise ValueError("int4s codes must lie in -7..7")
    c = codes.to(torch.int16) + 8
    if c.shape[-1] % 2:
        c = torch.cat([c, torch.full_like(c[..., :1], 0)], dim=-1)     # pad nibble 0 (never read back)
    return pack_nibbles(c.to(torch.uint8))


def unpack_v_int4s(packed: torch.Tensor, keep: int) -> torch.Tensor:
    """Inverse of :func:`pack_v_int4s`: int8 codes ``[d_out, keep]``."""
    return (unpack_nibbles(packed)[..., :keep].to(torch.int16) - 8).to(torch.int8).contiguous()


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
