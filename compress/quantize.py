"""Post-ROCKET weight quantization (pure math, no I/O): int8 / fp8 e4m3 / int4 factors, whitened-error scales.

Matrices use the ``y = x M`` convention: ``M`` is ``K x N`` (``K`` inputs, ``N`` outputs). Every scheme keeps
one scale per output column ``n`` (``int4`` one scale and zero point per ``(group of K, column)``). The clip
ratio of each scale is chosen by a grid search that minimises the *whitened* (activation-weighted) error
``||S dM||^2 = sum_n dM_n^T H dM_n`` with ``H = S^T S`` the calibration Gram (mean over tokens), not by max
scaling; the ratio 1.0 (max scaling) is always on the grid, so the search never loses to it on the metric
it evaluates. See docs/quantization.md for the derivations.

Storage forms and byte accounting: :mod:`rocket_deploy.quant_format`.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from rocket_deploy.quant_format import (DEFAULT_GROUP, FP8_MAX, FP16_TINY, INT4_LEVELS, INT4S_MAX, INT8_MAX, SCALE_BYTES,
                                         SCHEMES, bytes_fn, check_scheme, dequant_cols, dequant_int4, dequant_matrix,
                                         matrix_bytes, n_groups, pack_nibbles, quant_dense_bytes, quant_factor_bytes,
                                         pack_v_int4s, u_format, unpack_nibbles, v_format)
from rocket_deploy.sparse_format import factor_bytes, mask_bytes_per_column, pack_v

CLIP_RATIOS = (1.0, 0.97, 0.94, 0.9, 0.86, 0.82, 0.78, 0.72, 0.66, 0.6)



# ------------------------------------------------------------------------------------------------ error metrics
def column_errors(dm: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Per column ``n``: ``dM_n^T H dM_n`` (H 2-D, exact), ``sum_k h_k dM_kn^2`` (H 1-D: its diagonal), or
    ``||dM_n||^2`` (None)."""
    if hessian is None:
        return dm.pow(2).sum(0)
    if hessian.dim() == 1:
        return (hessian[:, None] * dm.pow(2)).sum(0)
    return ((hessian @ dm) * dm).sum(0)


def gram_of(s: torch.Tensor) -> torch.Tensor:
    """``H = S^T S`` from the upper whitening factor (``||S dM||^2 = tr(dM^T H dM)``)."""
    return s.t() @ s


# ------------------------------------------------------------------------------- per-column int8 / fp8 / int4s
_COL_QMAX = {"int8": INT8_MAX, "fp8": FP8_MAX, "int4s": INT4S_MAX}


def _round_codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantized codes of ``x`` (already divided by the scale) in their storage dtype (int4s: int8 codes -7..7,
    packed to nibbles only when stored)."""
    if fmt in ("int8", "int4s"):
        return torch.round(x).clamp_(-_COL_QMAX[fmt], _COL_QMAX[fmt]).to(torch.int8)
    if fmt == "fp8":
        return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    raise ValueError(f"unknown per-column format {fmt!r}")


def _qmax(fmt: str) -> float:
    return _COL_QMAX[fmt]


def quantize_cols(m: torch.Tensor, fmt: str, hessian: torch.Tensor | None = None,
                  ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column symmetric quantization of ``m [K, N]`` with a per-column clip-ratio search.

    Scale of column ``n`` at ratio ``a``: ``a * max_k |M_kn| / qmax`` (rounded to float32, the stored dtype);
    the ratio that minimises :func:`column_errors` with ``hessian`` is kept per column (ties keep the
    larger ratio). Returns ``(codes, scales float32 [N], dequantized [K, N] in m.dtype)``.
    """
    if fmt not in _COL_QMAX:
        raise ValueError(f"quantize_cols handles {tuple(_COL_QMAX)}, got {fmt!r}")
    amax = m.abs().amax(dim=0)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    best_err = best_scale = None
    for a in sorted(set(ratios) | {1.0}, reverse=True):
        scale = (amax * a / _qmax(fmt)).to(torch.float32)
        deq = dequant_cols(_round_codes(m / scale.to(m.dtype), fmt), scale, m.dtype)
        err = column_errors(deq - m, hessian)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    q = _round_codes(m / best_scale.to(m.dtype), fmt)
    return q, best_scale, dequant_cols(q, best_scale, m.dtype)


# ---------------------------------------------------------------------------------------------- group-wise int4
def _int4_params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16, the stored dtype) and integer zero point 0..15 of a range ``[lo, hi]``."""
    scale = ((hi - lo) / INT4_LEVELS).clamp_min(FP16_TINY).to(torch.float16).to(lo.dtype)
    zero = torch.round(-lo / scale).clamp_(0, INT4_LEVELS)
    return scale, zero


def _int4_deq(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = (torch.round(x / scale) + zero).clamp_(0, INT4_LEVELS)
    return codes, (codes - zero) * scale


def int4_diag_blocks(hessian: torch.Tensor | None, k: int, group: int) -> torch.Tensor | None:
    """The ``[nb, group, group]`` diagonal blocks of a ``K x K`` Gram (zero-padded to ``nb * group``), its padded
    diagonal ``[nb, group]`` when ``hessian`` is 1-D, or None."""
    if hessian is None:
        return None
    nb = n_groups(k, group)
    pad = nb * group - k
    if hessian.dim() == 1:
        hp = torch.cat([hessian, hessian.new_zeros(pad)]) if pad else hessian
        return hp.reshape(nb, group)
    hp = hessian
    if pad:
        hp = torch.zeros(nb * group, nb * group, dtype=hessian.dtype)
        hp[:k, :k] = hessian
    idx = torch.arange(nb)
    return hp.reshape(nb, group, nb, group)[idx, :, idx, :]


def int4_search(x: torch.Tensor, hblk: torch.Tensor | None, ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (group, column) scale and zero point of ``x [nb, group, N]`` (zero-padded rows) by the clip-ratio search
    on ``dM_g^T H_gg dM_g`` (``hblk`` from :func:`int4_diag_blocks`). Returns ``(scale, zero)``, each ``[nb, N]``."""
    lo0 = x.amin(dim=1).clamp(max=0)                   # [nb, N]
    hi0 = x.amax(dim=1).clamp(min=0)
    best = None
    for a in sorted(set(ratios) | {1.0}, reverse=True):
        scale, zero = _int4_params(lo0 * a, hi0 * a)
        _, deq = _int4_deq(x, scale[:, None, :], zero[:, None, :])
        d = deq - x
        if hblk is None:
            err = d.pow(2).sum(1)
        elif hblk.dim() == 2:
            err = (hblk[:, :, None] * d.pow(2)).sum(1)
        else:
            err = (torch.bmm(hblk, d) * d).sum(1)             # [nb, N]
        if best is None:
            best = [err, scale, zero]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
                     torch.where(better, zero, best[2])]
    return best[1], best[2]


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MatMulNBits storage of codes ``[K, N]`` (0..15) with ``scale, zero [nb, N]``: ``(packed uint8
    [N, nb, group/2], scales float16 [N, nb], zeros uint8 [N, ceil(nb/2)])``; K is zero-padded to ``nb*group``."""
    k, n = codes.shape
    nb = scale.shape[0]
    pad = nb * group - k
    c = codes.to(torch.uint8)
    if pad:
        c = torch.cat([c, torch.zeros(pad, n, dtype=torch.uint8)])
    packed = pack_nibbles(c.reshape(nb, group, n).permute(2, 0, 1))
    zcodes = zero.to(torch.uint8).t()                               # [N, nb]
    if nb % 2:
        zcodes = torch.cat([zcodes, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
    return packed, scale.t().to(torch.float16).contiguous(), pack_nibbles(zcodes)


def quantize_int4(m: torch.Tensor, group: int = DEFAULT_GROUP, hessian: torch.Tensor | None = None,
                  ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit quantization of ``m [K, N]``, groups of ``group`` rows along ``K``.

    Range of a (group, column): ``[a * min(x, 0), a * max(x, 0)]`` (zero always representable), clip ratio ``a``
    searched per (group, column) minimising ``dM_g^T H_gg dM_g`` -- the whitened error with the diagonal
    ``group x group`` block of ``H`` (exact inside a group; the couplings between groups are left out, which
    keeps the search separable). ``hessian`` may be the full ``K x K`` Gram, its diagonal, or None.
    Returns ``(packed uint8 [N, nb, group/2], scales float16 [N, nb], zeros uint8 [N, ceil(nb/2)],
    dequantized [K, N] in m.dtype)``.
    """
    check_group(group)
    k, n = m.shape
    nb = n_groups(k, group)
    pad = nb * group - k
    mp = torch.cat([m, m.new_zeros(pad, n)]) if pad else m
    x = mp.reshape(nb, group, n)                         # [nb, group, N]
    scale, zero = int4_search(x, int4_diag_blocks(hessian, k, group), ratios)
    codes, deq = _int4_deq(x, scale[:, None, :], zero[:, None, :])
    packed, scales16, zeros = int4_pack(codes.reshape(nb * group, n)[:k], scale, zero, group)
    return packed, scales16, zeros, deq.reshape(nb * group, n)[:k].contiguous()


def check_group(group: int) -> None:
    if group < 2 or group % 2:
        raise ValueError(f"int4 group size must be even and >= 2, got {group}")


# --------------------------------------------------------------------------------------------- quantized matrix
@dataclasses.dataclass
class QuantMatrix:
    """A ``K x N`` matrix in one storage format; ``deq`` is what the deployed model computes with."""
    fmt: str
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    deq: torch.Tensor
    k: int
    n: int
    group: int | None = None

    @property
    def bytes(self) -> int:
        return matrix_bytes(self.k, self.n, self.fmt, self.group or DEFAULT_GROUP)


def quantize_matrix(m: torch.Tensor, fmt: str, hessian: torch.Tensor | None = None, group: int = DEFAULT_GROUP,
                    ratios=CLIP_RATIOS) -> QuantMatrix:
    k, n = m.shape
    if fmt == "int4":
        packed, scales, zeros, deq = quantize_int4(m, group, hessian, ratios)
        return QuantMatrix(fmt, packed, scales, zeros, deq, k, n, group)
    q, scales, deq = quantize_cols(m, fmt, hessian, ratios)
    return QuantMatrix(fmt, q, scales, None, deq, k, n, None)


# ------------------------------------------------------------------------------------------ quantized factors
@dataclasses.dataclass
class QuantFactors:
    """Quantized ``U`` (``d_in x r``) and ``V`` (``r x d_out``, ``keep`` per column) of one layer."""
    scheme: str
    u: QuantMatrix
    v_values: torch.Tensor     # [d_out, keep] codes (int8 / float8_e4m3fn; int4s: uint8 [d_out, ceil(keep/2)]
                               # nibbles), kept rows in increasing order
    v_scales: torch.Tensor     # float32 [d_out]
    v_mask: torch.Tensor       # uint8 [d_out, ceil(r/8)]
    keep_mask: torch.Tensor    # bool [r, d_out]
    v_deq: torch.Tensor        # [r, d_out] dequantized V (zeros outside keep_mask)
    rank: int
    keep: int
    v_bits: int = 8

    @property
    def u_deq(self) -> torch.Tensor:
        return self.u.deq

    def bytes(self, d_in: int, d_out: int) -> int:
        return quant_factor_bytes(d_in, d_out, self.rank, self.keep, self.scheme, self.u.group or DEFAULT_GROUP,
                                  self.v_bits)


def normalize_components(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale rank components so that ``||S U_i|| = 1`` (``(U D)(D^-1 V) = U V`` exactly).

    Per-column quantization of U is invariant to this; for V it makes a unit of quantization noise on any
    kept entry cost about the same whitened error (``||S U_i||^2 dV_ij^2``), so one scale per output column
    of V serves all its rows evenly."""
    a = torch.linalg.vector_norm(s @ u, dim=0)
    a = torch.where(a > 0, a, torch.ones_like(a))
    return u / a[None, :], v * a[:, None]


def equalize_v_rows(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale rank components so that every row of ``V`` has max |value| 1 (``U`` absorbs the factor exactly).

    For 4-bit V values (one scale per output column, 15 levels): after :func:`normalize_components` the rows of
    V carry the whitened spectrum, so a column's step is set by its largest component and the small ones round
    to a few levels. With the per-entry whitened cost ``||S U_i||^2 dV_ij^2`` and a step proportional to the
    column's largest ``|V_ij|``, the error ``max_i(|V_ij|)^2 sum_i ||S U_i||^2`` is smallest when the rows of V
    have equal magnitude. U's quantization (per-column / per-(group, column) scales, GPTQ per column) is invariant
    to the rescaling."""
    a = v.abs().amax(dim=1)
    a = torch.where(a > 0, a, torch.ones_like(a))
    return u * a[None, :], v / a[:, None]


def quantize_factors(u: torch.Tensor, v: torch.Tensor, keep_mask: torch.Tensor, s: torch.Tensor, scheme: str,
                     group: int = DEFAULT_GROUP, u_metric: str = "exact", v_metric: str = "exact",
                     ratios=CLIP_RATIOS, u_method: str = "rtn", act_order: bool = False, v_refit: bool = False,
                     z: torch.Tensor | None = None, hinv_factor: torch.Tensor | None = None,
                     v_bits: int = 8) -> QuantFactors:
    """Quantize a factorization ``W ~ U V`` for deployment, minimising the whitened error ``||S(W - U_q V_q)||``.

    1. normalize the rank components (:func:`normalize_components`);
    2. U: per-column int8/fp8 (one scale per rank component) or group-wise int4, clip ratios searched with
       ``H = S^T S`` (``u_metric`` "exact": full H; "diag": its diagonal -- cheaper for wide layers). The
       whitened error of a column perturbation ``dU_i`` is ``||S dU_i||^2 ||V_i||^2`` (+ cross terms
       ``2 (S dU_i)^T (S dU_j) V_i V_j^T`` that vanish when the rows of V are orthogonal), so the per-column
       search over ``||S dU_i||^2`` alone is exact up to those cross terms;
    3. V: per-output-column int8/fp8 (``v_bits=4`` under int4: symmetric 4-bit ``int4s``) of the kept values,
       searched with the exact metric of a column
       perturbation given the *quantized* U: ``dV_j^T (U_q^T H U_q) dV_j`` (error feedback from U to V's
       scales; ``v_metric`` "exact": the full ``r x r`` matrix, "diag": its diagonal ``||S U_q,i||^2``).
    The pipeline uses "diag" for both (profiling evaluates thousands of candidates); the final errors it
    records are always exact (:func:`factor_error_stats`).

    Factor-aware options (docs/quantization.md, "GPTQ"): ``u_method="gptq"`` quantizes U by GPTQ with ``H``
    (the layer's input Gram; ``act_order``, ``hinv_factor`` as in :func:`compress.gptq.gptq_quantize`) instead
    of step 2's round-to-nearest; ``v_refit`` re-solves V's kept values by least squares on each column's
    support against ``z`` (``S W``; default ``S U V``) given ``S U_q`` (:mod:`compress.quant_refit`) before
    step 3 quantizes them.
    """
    v_fmt = v_format(scheme, v_bits)                    # validates scheme and v_bits
    for name, val in (("u_metric", u_metric), ("v_metric", v_metric)):
        if val not in ("exact", "diag"):
            raise ValueError(f"{name} must be 'exact' or 'diag', got {val!r}")
    dt = u.dtype
    s = s.to(dt)
    v = v.to(dt) * keep_mask.to(dt)
    u, v = normalize_components(u, v, s)
    if v_fmt == "int4s":
        u, v = equalize_v_rows(u, v)
    h = gram_of(s)
    if u_method == "gptq":
        from .gptq import gptq_quantize
        uq = gptq_quantize(u, h, u_format(scheme), group, act_order, ratios=ratios, hinv_factor=hinv_factor)
    elif u_method == "rtn":
        uq = quantize_matrix(u, u_format(scheme), h if u_metric == "exact" else torch.diagonal(h).clone(), group,
                             ratios)
    else:
        raise ValueError(f"u_method must be 'rtn' or 'gptq', got {u_method!r}")
    su = s @ uq.deq
    if v_refit:
        from .quant_refit import refit_v_on_support
        v = refit_v_on_support(su, (z.to(dt) if z is not None else s @ (u @ v)), keep_mask, v0=v)
    hv = su.t() @ su if v_metric == "exact" else su.pow(2).sum(0)
    vq, v_scales, v_deq = quantize_cols(v, v_fmt, hv, ratios)
    v_deq = v_deq * keep_mask.to(dt)
    if vq.dtype == torch.float8_e4m3fn:
        vals, mask = pack_v(vq.view(torch.uint8), keep_mask)
        vals = vals.view(torch.float8_e4m3fn)
    else:
        vals, mask = pack_v(vq, keep_mask)
    if v_fmt == "int4s":
        vals = pack_v_int4s(vals)
    r = u.shape[1]
    k = int(keep_mask[:, 0].sum()) if keep_mask.shape[1] else r
    return QuantFactors(scheme, uq, vals.contiguous(), v_scales, mask, keep_mask, v_deq, r, k, v_bits)


def quantize_dense(w: torch.Tensor, s: torch.Tensor, scheme: str, group: int = DEFAULT_GROUP,
                   ratios=CLIP_RATIOS, metric: str = "exact") -> QuantMatrix:
    """The dense-weight option / baseline: ``w [d_in, d_out]`` per output channel (int8 / fp8) or group-wise
    along d_in (int4), clip ratios searched on the whitened error with ``H = S^T S``."""
    h = gram_of(s.to(w.dtype))
    return quantize_matrix(w, u_format(scheme), h if metric == "exact" else torch.diagonal(h).clone(), group, ratios)


@dataclasses.dataclass
class ErrorStats:
    rel_original: float
    rel_whitened: float
    whitened_sq: float
    col_sq: torch.Tensor


def error_stats(w: torch.Tensor, w_hat: torch.Tensor, s: torch.Tensor, z_norm: float | None = None) -> ErrorStats:
    """Errors of an approximation ``w_hat`` of ``w`` (both ``d_in x d_out``): as :class:`Factorization` reports."""
    dw = w - w_hat
    sdw = s.to(dw.dtype) @ dw
    col_sq = sdw.pow(2).sum(0)
    wsq = float(col_sq.sum())
    if z_norm is None:
        z_norm = float(torch.linalg.matrix_norm(s.to(w.dtype) @ w))
    return ErrorStats(float(torch.linalg.matrix_norm(dw)) / max(float(torch.linalg.matrix_norm(w)), 1e-30),
                      math.sqrt(wsq) / max(z_norm, 1e-30), wsq, col_sq)


def factor_error_stats(w: torch.Tensor, qf: QuantFactors, s: torch.Tensor, z: torch.Tensor | None = None,
                       z_norm: float | None = None) -> ErrorStats:
    """Exact errors of the quantized factors: ``||S (W - U_q V_q)||`` computed as ``Z - (S U_q) V_q``."""
    dt = w.dtype
    s = s.to(dt)
    if z is None:
        z = s @ w
    resid = z - (s @ qf.u_deq.to(dt)) @ qf.v_deq.to(dt)
    col_sq = resid.pow(2).sum(0)
    wsq = float(col_sq.sum())
    w_norm = float(torch.linalg.matrix_norm(w))
    dw = w - qf.u_deq.to(dt) @ qf.v_deq.to(dt)
    zn = z_norm if z_norm is not None else float(torch.linalg.matrix_norm(z))
    return ErrorStats(float(torch.linalg.matrix_norm(dw)) / max(w_norm, 1e-30), math.sqrt(wsq) / max(zn, 1e-30),
                      wsq, col_sq)
