"""ROCKET factorization of one weight matrix (pure math, no hooks, no I/O).

Notation: ``W`` is ``d_in x d_out`` (``y = x W``), ``S`` the upper whitening factor, ``Z = S W``.
One eigendecomposition per matrix (:func:`eigenbasis`) serves every (rank, keep) candidate (:func:`factorize`).
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class Eigenbasis:
    w: torch.Tensor            # d_in x d_out
    z: torch.Tensor            # S W
    s: torch.Tensor            # S (upper whitening factor)
    s_inv: torch.Tensor        # S^-1 (upper)
    basis: torch.Tensor        # B: eigenvectors of Z Z^T, columns sorted by decreasing eigenvalue
    coeffs: torch.Tensor       # B^T Z (all d_in rows; rank r uses the first r)
    orig_norms: torch.Tensor   # ||S^-1 b_i||_2
    eigvals: torch.Tensor
    w_norm: float
    z_norm: float

    @property
    def max_rank(self) -> int:
        return min(self.w.shape)

    def to(self, dtype: torch.dtype) -> "Eigenbasis":
        conv = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in conv.items():
            if isinstance(v, torch.Tensor):
                conv[k] = v.to(dtype)
        return Eigenbasis(**conv)


def eigenbasis(w: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor | None = None,
               z: torch.Tensor | None = None) -> Eigenbasis:
    """Everything that does not depend on (rank, keep), in float64. ``z`` overrides the whitened target
    ``S W`` (error propagation, :mod:`.propagate`: ``Z = S_c^-T X_c^T X_d W``)."""
    w64 = w.to(torch.float64)
    s64 = s.to(torch.float64)
    if s_inv is None:
        from .whitening import inverse_upper
        s_inv = inverse_upper(s64)
    s_inv = s_inv.to(torch.float64)
    z = s64 @ w64 if z is None else z.to(torch.float64)
    evals, evecs = torch.linalg.eigh(z @ z.t())
    order = torch.argsort(evals, descending=True)
    basis = evecs[:, order].contiguous()
    evals = evals[order].clamp_min(0)
    coeffs = basis.t() @ z
    orig_norms = torch.linalg.vector_norm(s_inv @ basis, dim=0)
    return Eigenbasis(w64, z, s64, s_inv, basis, coeffs, orig_norms, evals,
                      float(torch.linalg.matrix_norm(w64)), float(torch.linalg.matrix_norm(z)))


def select_keep_mask(c: torch.Tensor, orig_norms: torch.Tensor, keep: int, lam: float = 0.5,
                     oversparsify: float = 0.005) -> torch.Tensor:
    """Boolean ``r x d_out`` mask with exactly ``keep`` entries per column.

    First each column keeps its ``keep - delta`` entries of highest importance
    ``|c_ij| * ||S^-1 b_i||^lam`` (lam = 0.5: the geometric mean of the whitened-space score ``|c|`` and the
    original-space score ``|c| ||S^-1 b_i||``), ``delta = round(oversparsify * r)``. Then the most valuable
    dropped entries by the original-space score are re-activated, globally ranked but capped at ``keep`` per
    column, until the budget of ``keep * d_out`` entries is met exactly.
    """
    r, d_out = c.shape
    if not 0 < keep <= r:
        raise ValueError(f"keep must be in [1, {r}], got {keep}")
    if keep == r:
        return torch.ones_like(c, dtype=torch.bool)
    absc = c.abs()
    delta = min(keep - 1, int(round(oversparsify * r)))
    importance = absc * orig_norms[:r, None].pow(lam)
    mask = torch.zeros_like(c, dtype=torch.bool)
    top = torch.topk(importance, keep - delta, dim=0).indices
    mask.scatter_(0, top, True)
    if delta > 0:
        # With a per-column cap of `keep` and a total of keep * d_out, every column takes exactly `delta` more:
        # the global ranking reduces to the best `delta` dropped entries of each column.
        orig_score = (absc * orig_norms[:r, None]).masked_fill(mask, -1.0)
        extra = torch.topk(orig_score, delta, dim=0).indices
        mask.scatter_(0, extra, True)
    return mask


def ridge_refit(z: torch.Tensor, v: torch.Tensor, ridge_rel: float = 1e-3) -> torch.Tensor:
    """Dictionary ``D = Z V^T (V V^T + mu I)^-1`` with ``mu = max(1e-6, ridge_rel * tr(V V^T) / r)``."""
    r = v.shape[0]
    q = v @ v.t()
    mu = max(1e-6, ridge_rel * float(torch.trace(q)) / r)
    q = q + mu * torch.eye(r, dtype=q.dtype)
    p = z @ v.t()
    # Solve D Q = P for D (Q is symmetric positive definite).
    chol = torch.linalg.cholesky(q)
    return torch.cholesky_solve(p.t(), chol).t()


@dataclasses.dataclass
class Factorization:
    u: torch.Tensor          # d_in x r
    v: torch.Tensor          # r x d_out, zeros outside keep_mask
    keep_mask: torch.Tensor  # r x d_out bool
    rank: int
    keep: int
    rel_original: float      # ||W - U V||_F / ||W||_F
    rel_whitened: float      # ||S (W - U V)||_F / ||S W||_F
    whitened_sq: float       # ||S (W - U V)||_F^2 = ||X (W - U V)||_F^2 over the calibration tokens
    col_sq: torch.Tensor | None = None   # per output column ||S (W - U V)_:,j||^2


def factorize(eb: Eigenbasis, rank: int, keep: int, lam: float = 0.5, oversparsify: float = 0.005,
              ridge_rel: float = 1e-3, refit: bool = True, refit_rounds: int = 0) -> Factorization:
    """Factorize at (rank, keep) from a precomputed :class:`Eigenbasis` (any float dtype). ``refit_rounds`` > 0
    then alternates least-squares V on its support with the dictionary refit (:func:`.refit.alternate_refit`)."""
    if not 0 < rank <= eb.basis.shape[1]:
        raise ValueError(f"rank must be in [1, {eb.basis.shape[1]}], got {rank}")
    c = eb.coeffs[:rank]
    mask = select_keep_mask(c, eb.orig_norms, keep, lam, oversparsify)
    v = c * mask
    if keep == rank or not refit:
        d = eb.basis[:, :rank]          # dense V: the truncated whitened SVD is already least-squares optimal
    else:
        d = ridge_refit(eb.z, v, ridge_rel)
        if refit_rounds > 0:
            from .refit import alternate_refit
            d, v, _ = alternate_refit(eb.z, d, v, mask, refit_rounds, ridge_rel)
    resid = eb.z - d @ v
    col_sq = resid.pow(2).sum(0)
    whitened_sq = float(col_sq.sum())
    u = eb.s_inv @ d
    rel_orig = float(torch.linalg.matrix_norm(eb.w - u @ v)) / max(eb.w_norm, 1e-30)
    return Factorization(u, v, mask, rank, keep, rel_orig, math.sqrt(whitened_sq) / max(eb.z_norm, 1e-30),
                         whitened_sq, col_sq)


def balance_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so that column i of U and row i of V have the same max magnitude.

    ``(U D)(D^-1 V) = U V`` exactly; the balance keeps both factors well inside fp16 / int8 range (whitened
    coefficients can be orders of magnitude larger than U when the input has outlier channels)."""
    umax = u.abs().amax(dim=0).clamp_min(1e-30)
    vmax = v.abs().amax(dim=1).clamp_min(1e-30)
    scale = torch.sqrt(vmax / umax)
    return u * scale[None, :], v / scale[:, None]


def fisher_error(col_sq: torch.Tensor, sensitivity: torch.Tensor | None) -> float:
    """The ``fisher`` objective of a factorization: ``sum_j f_j ||S dW_:,j||^2`` (``col_sq`` the per-column
    whitened squared errors, ``f`` the output sensitivities); 0 when no sensitivity was measured."""
    return 0.0 if sensitivity is None else float(col_sq.to(torch.float64) @ sensitivity.to(torch.float64))
