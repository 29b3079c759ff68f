"""Refit V's kept values to a quantized U (pure math): least squares on each output column's support.

``Z = S W`` is the whitened weight, ``A = S U_q`` the whitened quantized dictionary (``d_in x r``). With U fixed,
column ``j`` of V with support ``T_j`` (its kept rows) solves ``min_v ||Z_j - A_T v||^2``, i.e. the ``k x k``
system ``(A_T^T A_T + mu I) v = A_T^T Z_j``. All systems share ``G = A^T A`` and ``B = A^T Z``: gather the
``T_j x T_j`` blocks of ``G`` and solve them batched by Cholesky, a few hundred columns at a time.
"""
from __future__ import annotations

import torch

REFIT_RIDGE = 1e-6        # mu = REFIT_RIDGE * mean(diag G): a guard against a singular G_TT, not a prior
COLUMN_CHUNK = 256


def _chol_solve(g: torch.Tensor, b: torch.Tensor, ridge_rel: float) -> torch.Tensor:
    """Solve ``(g + mu I) x = b`` for a batch of SPD ``g [..., k, k]``, ``b [..., k]``; mu grows on failure."""
    k = g.shape[-1]
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    diag = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    for eps in (ridge_rel, 1e-8, 1e-6, 1e-4, 1e-2):
        lo, info = torch.linalg.cholesky_ex(g + eps * diag * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(b[..., None], lo)[..., 0]
    raise ValueError("V refit: the quantized dictionary's Gram is singular; use quant_v_refit=False")


def refit_v_on_support(a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, ridge_rel: float = REFIT_RIDGE,
                       chunk: int = COLUMN_CHUNK) -> torch.Tensor:
    """``V [r, d_out]``, zero outside ``mask`` (bool ``[r, d_out]``, the same number of kept rows per column),
    minimising ``||Z - A V||_F`` column by column on the support (see the module docstring)."""
    r, d_out = mask.shape
    g = a.t() @ a
    b = a.t() @ z                                       # [r, d_out]
    keep = int(mask[:, 0].sum()) if d_out else r
    if bool(mask.all()):
        return _chol_solve(g, b.t(), ridge_rel).t().contiguous()
    if not bool((mask.sum(0) == keep).all()):
        raise ValueError("V refit needs the same number of kept entries in every column of V")
    idx = mask.t().nonzero()[:, 1].view(d_out, keep)    # kept rows per column, increasing
    v = torch.zeros(r, d_out, dtype=a.dtype, device=a.device)
    for c0 in range(0, d_out, chunk):
        ix = idx[c0:c0 + chunk]                          # [c, k]
        gs = g[ix[:, :, None], ix[:, None, :]]           # [c, k, k]
        cols = torch.arange(c0, c0 + ix.shape[0], device=ix.device)
        bs = b[ix, cols[:, None]]                        # [c, k]
        v[ix, cols[:, None]] = _chol_solve(gs, bs, ridge_rel)
    return v
