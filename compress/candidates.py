"""The grid of (rank, keep-per-column) options profiled for each layer, sized in deployed bytes."""
from __future__ import annotations

import dataclasses

from rocket_deploy.sparse_format import dense_weight_bytes, factor_bytes, factor_params


@dataclasses.dataclass(frozen=True)
class Candidate:
    rank: int
    keep: int
    bytes: int
    params: int
    byte_fraction: float     # bytes / dense bytes
    keep_ratio: float        # keep / rank


def fit_rank(d_in: int, d_out: int, target_bytes: float, keep_ratio: float, multiple: int = 8,
             bytes_fn=factor_bytes) -> tuple[int, int] | None:
    """Largest rank (a multiple of ``multiple``, at most ``min(d_in, d_out)``) whose factors with
    ``keep = round(keep_ratio * rank)`` fit in ``target_bytes``. None if not even the smallest fits."""
    def keep_of(r: int) -> int:
        return r if keep_ratio >= 1 else max(1, min(r - 1, int(round(keep_ratio * r))))

    max_rank = min(d_in, d_out)
    lo, hi, best = 1, max_rank // multiple, None
    while lo <= hi:                      # bytes grow monotonically with rank: binary search
        mid = (lo + hi) // 2
        r = mid * multiple
        if bytes_fn(d_in, d_out, r, keep_of(r)) <= target_bytes:
            best, lo = r, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return None
    return best, keep_of(best)


def candidate_grid(d_in: int, d_out: int, byte_fractions, keep_ratios, multiple: int = 8,
                   bytes_fn=factor_bytes) -> list[Candidate]:
    """One candidate per (byte fraction, keep ratio), deduplicated; all strictly smaller than the dense weight."""
    dense = dense_weight_bytes(d_in, d_out)
    seen, out = set(), []
    for f in sorted(byte_fractions):
        for kr in sorted(keep_ratios, reverse=True):
            fit = fit_rank(d_in, d_out, f * dense, kr, multiple, bytes_fn)
            if fit is None or fit in seen:
                continue
            r, k = fit
            if kr < 1 and k >= r:
                continue
            seen.add(fit)
            b = bytes_fn(d_in, d_out, r, k)
            if b < dense:
                out.append(Candidate(r, k, b, factor_params(d_in, d_out, r, k), b / dense, k / r))
    return out
