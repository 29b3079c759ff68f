"""GPTQ-style error-compensating quantization of one matrix (pure math, no I/O).

``y = x M`` convention: ``M`` is ``K x N`` (``K`` inputs). The error of a quantized ``M_q`` is the whitened
``tr(dM^T H dM)`` with ``H`` the calibration Gram of the inputs (the same Gram the profile whitens with). GPTQ
quantizes the rows of ``M`` (input dimensions) one at a time and, after rounding row ``k``, moves the rounding
error onto the rows not yet quantized so that the whitened error is minimised given the rows already fixed
(Optimal Brain Surgeon update). With ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), the update
after row ``k`` is ``M[j] -= U[k, j] * (M[k] - Q[k]) / U[k, k]`` for ``j > k`` -- equivalent to the OBS update
with the inverse Hessian of the remaining rows, without ever re-inverting. Rows are processed in blocks; inside a
block updates are applied immediately, to later blocks once per block (lazy batch update, one matrix product).

Scales: per-column formats (int8 / fp8) fix one scale per column up front (clip search on the whitened error, as
round-to-nearest does); int4 groups choose their scale and zero point when the group is reached, from the rows as
updated so far (clip search with the group's diagonal block of ``H``). With ``act_order`` rows are processed in
order of decreasing ``H_kk`` and int4 group parameters are fixed up front from the original rows ("static
groups"), so the stored layout stays contiguous groups along ``K`` (MatMulNBits).
See docs/quantization.md, "GPTQ".
"""
from __future__ import annotations

import torch

from rocket_deploy.quant_format import DEFAULT_GROUP, INT4_LEVELS, INT8_MAX, FP8_MAX, n_groups

from .quantize import CLIP_RATIOS, QuantMatrix, check_group, int4_diag_blocks, int4_pack, int4_search, quantize_cols

GPTQ_DAMP = 0.01          # H + GPTQ_DAMP * mean(diag H) * I before inverting (the paper's default)
GPTQ_BLOCK = 128


def inverse_hessian_factor(h: torch.Tensor, damp: float = GPTQ_DAMP) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) I)^-1`` (float64). Inputs with ``H_kk == 0`` (never
    active) get ``H_kk = 1``: their rows cannot change the output and are just rounded."""
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    h += damp * mean_diag * torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(8):
        lo, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h += mean_diag * 10.0 ** (attempt - 6) * torch.eye(h.shape[0], dtype=h.dtype)
    else:
        raise ValueError("the calibration Gram is not positive definite even with damping; profile with "
                         "--gram-damping 0.01 or more calibration text")
    hinv = torch.cholesky_inverse(lo)
    return torch.linalg.cholesky(hinv, upper=True)


def _round_row(x: torch.Tensor, fmt: str, scale: torch.Tensor, zero: torch.Tensor | None):
    """Codes and dequantized values of one row ``x [N]`` with per-column ``scale`` (and int4 ``zero``)."""
    if fmt == "int4":
        codes = (torch.round(x / scale) + zero).clamp_(0, INT4_LEVELS)
        return codes, (codes - zero) * scale
    if fmt == "int8":
        codes = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX)
        return codes, codes * scale
    codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, codes.to(x.dtype) * scale


def gptq_quantize(m: torch.Tensor, hessian: torch.Tensor, fmt: str, group: int = DEFAULT_GROUP,
                  act_order: bool = False, damp: float = GPTQ_DAMP, block: int = GPTQ_BLOCK,
                  ratios=CLIP_RATIOS, hinv_factor: torch.Tensor | None = None) -> QuantMatrix:
    """Quantize ``m [K, N]`` to ``fmt`` ("int8" | "fp8" | "int4") minimising ``tr(dM^T H dM)`` by GPTQ.

    ``hessian`` is the full ``K x K`` Gram; ``hinv_factor`` may pass :func:`inverse_hessian_factor` of it (in the
    processing order) when many matrices share one Gram. Returns a :class:`QuantMatrix` in the same storage as
    round-to-nearest (:func:`compress.quantize.quantize_matrix`), so artifacts, export and runtimes are unchanged.
    """
    if fmt not in ("int8", "fp8", "int4"):
        raise ValueError(f"GPTQ handles int8 / fp8 / int4, got {fmt!r}")
    k, n = m.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be {k} x {k} for a {k} x {n} matrix, got {tuple(hessian.shape)}")
    dt = m.dtype
    h = hessian.to(dt)
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else None
    static = None                       # int4 group params fixed up front (act_order), [nb, N] each
    if fmt == "int4":
        check_group(group)
        nb = n_groups(k, group)
        if act_order:
            pad = nb * group - k
            mp = torch.cat([m, m.new_zeros(pad, n)]) if pad else m
            static = int4_search(mp.reshape(nb, group, n), int4_diag_blocks(h, k, group), ratios)
        scales_g = torch.zeros(nb, n, dtype=dt)
        zeros_g = torch.zeros(nb, n, dtype=dt)
        block = group if not act_order else block      # a block is a group: its params are chosen at its start
    else:
        col_scale = quantize_cols(m, fmt, h, ratios)[1].to(dt)
    w = (m[perm] if act_order else m).clone()
    hp = hessian[perm][:, perm] if act_order else hessian
    u = (hinv_factor if hinv_factor is not None else inverse_hessian_factor(hp, damp)).to(dt)
    order = perm if act_order else torch.arange(k)
    codes = torch.zeros(k, n, dtype=torch.float32 if fmt != "fp8" else dt)
    qvals = torch.zeros(k, n, dtype=dt)
    fp8_codes = torch.zeros(k, n, dtype=torch.float8_e4m3fn) if fmt == "fp8" else None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if fmt == "int4" and not act_order:          # group g = rows i1..i2 (block == group), current values
            g = i1 // group
            x = torch.cat([w1, w1.new_zeros(group - (i2 - i1), n)]) if i2 - i1 < group else w1
            s_, z_ = int4_search(x[None], int4_diag_blocks(h[i1:i2, i1:i2], i2 - i1, group), ratios)
            scales_g[g], zeros_g[g] = s_[0], z_[0]
        for i in range(i2 - i1):
            row = w1[i]
            if fmt == "int4":
                g = int(order[i1 + i]) // group
                sc, ze = (static[0][g], static[1][g]) if static is not None else (scales_g[g], zeros_g[g])
                c, q = _round_row(row, fmt, sc, ze)
            else:
                c, q = _round_row(row, fmt, col_scale, None)
            if fmt == "fp8":
                fp8_codes[i1 + i] = c
            else:
                codes[i1 + i] = c
            qvals[i1 + i] = q
            e = (row - q) / u1[i, i]
            w1[i + 1:] -= u1[i, i + 1:, None] * e[None, :]
            err1[i] = e
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].t() @ err1
    inv = torch.argsort(perm) if act_order else None
    if act_order:
        qvals = qvals[inv]
        codes = codes[inv]
        fp8_codes = fp8_codes[inv] if fp8_codes is not None else None
    if fmt == "int4":
        sc, ze = static if static is not None else (scales_g, zeros_g)
        packed, scales16, zeros = int4_pack(codes, sc, ze, group)
        return QuantMatrix("int4", packed, scales16, zeros, qvals.contiguous(), k, n, group)
    q = codes.to(torch.int8) if fmt == "int8" else fp8_codes
    return QuantMatrix(fmt, q, col_scale.to(torch.float32), None, qvals.contiguous(), k, n, None)


def quantize_matrix_method(m: torch.Tensor, fmt: str, hessian: torch.Tensor | None, group: int = DEFAULT_GROUP,
                           method: str = "rtn", act_order: bool = False, metric: str = "exact",
                           hinv_factor: torch.Tensor | None = None) -> QuantMatrix:
    """``method`` "rtn": round to nearest with the whitened clip search (:func:`compress.quantize.quantize_matrix`,
    ``metric`` "exact" | "diag" of ``hessian``); "gptq": :func:`gptq_quantize` with the full ``hessian``."""
    from .quantize import quantize_matrix
    if method == "gptq":
        if hessian is None or hessian.dim() != 2:
            raise ValueError("GPTQ needs the full calibration Gram")
        return gptq_quantize(m, hessian, fmt, group, act_order, hinv_factor=hinv_factor)
    if method != "rtn":
        raise ValueError(f"quantization method must be 'rtn' or 'gptq', got {method!r}")
    h = hessian if hessian is None or metric == "exact" else torch.diagonal(hessian).clone()
    return quantize_matrix(m, fmt, h, group)
