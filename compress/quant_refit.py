"""Least squares for V's kept values on a fixed support (pure math): the V step of the both-factor refit
(:mod:`.refit`) and the refit of V to a quantized U (:mod:`.quantize`).

``Z = S W`` is the whitened weight, ``A`` a whitened dictionary (``d_in x r``; ``S U`` or ``S U_q``). With A fixed,
column ``j`` of V with support ``T_j`` (its kept rows) solves ``min_v ||Z_j - A_T v||^2 + mu_j ||v||^2``, i.e. the
``k x k`` system ``(A_T^T A_T + mu_j I) v = A_T^T Z_j``, ``mu_j = ridge * mean(diag G_TT)``. All systems share
``G = A^T A`` and ``B = A^T Z``.

Solved by conjugate gradients on every column at once, each iteration one ``r x r x d_out`` product
``G P`` masked to the supports (Jacobi-preconditioned; ``v0``, the current V, as the start). ``A`` is close to
orthogonal here (a refit of the orthonormal eigenbasis), so the systems are well conditioned and a few
iterations reach the exact solution to rounding: on SmolLM2 layers 10 iterations leave a relative error gap of
1e-11 against the direct solve, ~10x faster. Columns that have not converged after ``CG_MAX_ITERS`` (ill-conditioned
supports) are solved directly: their ``T_j x T_j`` blocks of ``G`` gathered and factored by batched Cholesky.
"""
from __future__ import annotations

import torch

REFIT_RIDGE = 1e-6        # mu = REFIT_RIDGE * mean(diag G_TT): a guard against a singular G_TT, not a prior
COLUMN_CHUNK = 256        # direct solve: columns gathered at a time
CG_MAX_ITERS = 60
CG_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}   # relative residual ||r_j|| / ||B_T,j|| counted converged


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


def _direct(g: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, cols: torch.Tensor, v: torch.Tensor,
            ridge_rel: float, chunk: int) -> None:
    """Solve the columns ``cols`` (their kept rows ``idx [len(cols), k]``) directly into ``v``."""
    for c0 in range(0, cols.shape[0], chunk):
        ix, cs = idx[c0:c0 + chunk], cols[c0:c0 + chunk]
        gs = g[ix[:, :, None], ix[:, None, :]]           # [c, k, k]
        v[ix, cs[:, None]] = _chol_solve(gs, b[ix, cs[:, None]], ridge_rel)


def _cg(g: torch.Tensor, b: torch.Tensor, m: torch.Tensor, mu: torch.Tensor, v: torch.Tensor,
        max_iters: int, tol: float, check_every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Preconditioned CG on ``(P_j G P_j + mu_j I) v_j = P_j b_j`` for all columns (``m`` the float mask).
    Returns ``(v, converged)``, ``converged`` judged on the true residual after the last iteration."""
    def residual(x):
        return torch.addcmul(m * (b - g @ x), mu, x, value=-1)
    inv_diag = 1.0 / (torch.diagonal(g)[:, None] + mu)
    target = tol * torch.linalg.vector_norm(m * b, dim=0).clamp_min(1e-300)
    v = v.clone()
    r = residual(v)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(0)
    q = torch.empty_like(p)
    for it in range(max_iters):
        if it % check_every == 0 and bool((torch.linalg.vector_norm(r, dim=0) <= target).all()):
            break
        torch.mm(g, p, out=q)
        q.mul_(m).addcmul_(mu, p)
        pq = (p * q).sum(0)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(1e-300), torch.zeros_like(pq))
        v.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        torch.mul(r, inv_diag, out=z)
        rz_new = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p.mul_(beta).add_(z)
        rz = rz_new
    converged = torch.linalg.vector_norm(residual(v), dim=0) <= target
    return v.mul_(m), converged


def refit_v_on_support(a: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, ridge_rel: float = REFIT_RIDGE,
                       chunk: int = COLUMN_CHUNK, v0: torch.Tensor | None = None,
                       max_iters: int = CG_MAX_ITERS) -> torch.Tensor:
    """``V [r, d_out]``, zero outside ``mask`` (bool ``[r, d_out]``, the same number of kept rows per column),
    minimising ``||Z - A V||_F`` column by column on the support (see the module docstring). ``v0``: a start
    for the iterations (the current V); ``max_iters=0`` solves every column directly."""
    r, d_out = mask.shape
    g = a.t() @ a
    b = a.t() @ z                                       # [r, d_out]
    keep = int(mask[:, 0].sum()) if d_out else r
    if bool(mask.all()):
        return _chol_solve(g, b.t(), ridge_rel).t().contiguous()
    if not bool((mask.sum(0) == keep).all()):
        raise ValueError("V refit needs the same number of kept entries in every column of V")
    m = mask.to(g.dtype)
    mu = ridge_rel * (torch.diagonal(g)[:, None] * m).sum(0, keepdim=True) / max(keep, 1)
    v = torch.zeros(r, d_out, dtype=a.dtype, device=a.device)
    left = torch.arange(d_out, device=a.device)
    if max_iters > 0:
        start = v0.to(g.dtype) * m if v0 is not None else (m * b) / (torch.diagonal(g)[:, None] + mu)
        v, ok = _cg(g, b, m, mu, start, max_iters, CG_TOL.get(g.dtype, 1e-5))
        left = (~ok).nonzero()[:, 0]
        if left.numel():
            v[:, left] = 0
    if left.numel():
        idx = mask.t().nonzero()[:, 1].view(d_out, keep)    # kept rows per column, increasing
        _direct(g, b, idx[left], left, v, ridge_rel, chunk)
    return v
