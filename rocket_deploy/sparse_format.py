"""The deployed storage format of one ROCKET layer and its byte accounting.

A compressed layer computes ``y = (x U) V + b`` with

* ``U``: dense ``d_in x r`` (stored fp16),
* ``V``: ``r x d_out`` with exactly ``k`` nonzeros in every output column, stored column by column as

  - ``mask``:   ``uint8 [d_out, ceil(r/8)]`` -- bit ``i`` of column ``j`` is byte ``i // 8``, bit ``i % 8``
    (least significant first); set when basis row ``i`` is kept in column ``j``;
  - ``values``: ``[d_out, k]`` -- the kept values of column ``j`` in increasing row order.

When ``k == r`` the layer is dense-factorized: ``values`` is simply ``V^T`` and no mask is stored
(its bytes are not counted). See ``docs/format.md``.
"""
from __future__ import annotations

import torch

FORMAT_VERSION = 2          # newest artifact format this code reads and writes
BASE_FORMAT_VERSION = 1     # unquantized artifacts: unchanged since version 1, still written as 1
QUANTIZED_FORMAT_VERSION = 2  # artifacts with quantized factors / weights (docs/quantization.md)
FP16_BYTES = 2


def artifact_format_version(quantized: bool) -> int:
    """The version an artifact is written with: 1 unless it holds quantized layers (older readers refuse 2)."""
    return QUANTIZED_FORMAT_VERSION if quantized else BASE_FORMAT_VERSION


def mask_bytes_per_column(rank: int) -> int:
    return (rank + 7) // 8


def dense_weight_bytes(d_in: int, d_out: int, elem_bytes: int = FP16_BYTES) -> int:
    """Bytes of the original dense weight stored at ``elem_bytes`` per element."""
    return d_in * d_out * elem_bytes


def factor_bytes(d_in: int, d_out: int, rank: int, keep: int,
                 u_elem_bytes: float = FP16_BYTES, v_elem_bytes: float = FP16_BYTES,
                 extra_bytes: int = 0) -> int:
    """Deployed bytes of a factorized layer: dense U, plus V (bitmask + packed values, or dense when k == r).

    ``extra_bytes`` carries side data such as quantization scales.
    """
    if not 0 < keep <= rank:
        raise ValueError(f"keep must be in [1, rank={rank}], got {keep}")
    u = d_in * rank * u_elem_bytes
    if keep == rank:
        v = rank * d_out * v_elem_bytes
    else:
        v = d_out * (mask_bytes_per_column(rank) + keep * v_elem_bytes)
    return int(round(u + v)) + int(extra_bytes)


def factor_params(d_in: int, d_out: int, rank: int, keep: int) -> int:
    """Parameters counted the paper's way: values only, no index cost."""
    return d_in * rank + d_out * keep


def pack_v(v: torch.Tensor, keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``V`` (r x d_out) given a boolean ``keep_mask`` (r x d_out) with the same count in every column.

    Returns ``(values [d_out, k], mask uint8 [d_out, ceil(r/8)])``.
    """
    if v.shape != keep_mask.shape or v.dim() != 2:
        raise ValueError(f"V {tuple(v.shape)} and keep mask {tuple(keep_mask.shape)} must be equal 2-D shapes")
    r, d_out = v.shape
    counts = keep_mask.sum(dim=0)
    k = int(counts[0]) if d_out else 0
    if d_out and not bool((counts == k).all()):
        raise ValueError("every output column of V must keep the same number of entries")
    mt = keep_mask.t().contiguous()  # d_out x r
    # Row order inside a column: stable sort of the mask puts kept rows first, in increasing order.
    order = torch.argsort((~mt).to(torch.int8), dim=1, stable=True)[:, :k]
    values = torch.gather(v.t(), 1, order).contiguous()
    return values, pack_bits(mt)


def pack_bits(bool_rows: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``[n, r]`` matrix into ``uint8 [n, ceil(r/8)]``, LSB first."""
    n, r = bool_rows.shape
    nb = mask_bytes_per_column(r)
    padded = torch.zeros(n, nb * 8, dtype=torch.uint8)
    padded[:, :r] = bool_rows.to(torch.uint8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(n, nb, 8) * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def unpack_bits(mask: torch.Tensor, rank: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8 [n, ceil(r/8)]`` -> bool ``[n, r]``."""
    n, nb = mask.shape
    if nb != mask_bytes_per_column(rank):
        raise ValueError(f"mask has {nb} bytes per column, rank {rank} needs {mask_bytes_per_column(rank)}")
    shifts = torch.arange(8, dtype=torch.int32)
    bits = (mask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(n, nb * 8)[:, :rank].bool()


def full_mask(rank: int, d_out: int) -> torch.Tensor:
    return pack_bits(torch.ones(d_out, rank, dtype=torch.bool))


def unpack_v(values: torch.Tensor, mask: torch.Tensor, rank: int) -> torch.Tensor:
    """Expand packed ``(values [d_out, k], mask)`` into dense ``V`` (r x d_out) in ``values.dtype``."""
    d_out, k = values.shape
    kept = unpack_bits(mask, rank)  # d_out x r
    counts = kept.sum(dim=1)
    if d_out and not bool((counts == k).all()):
        raise ValueError(f"mask keeps {counts.min().item()}..{counts.max().item()} rows per column, values have {k}")
    vt = torch.zeros(d_out, rank, dtype=values.dtype)
    vt[kept] = values.reshape(-1)
    return vt.t().contiguous()
