"""ROCKET factorization of one weight matrix (pure math, no hooks, no I/O).

Notation: ``W`` is ``d_in x d_out`` (``y = x W``), ``S`` the upper whitening factor, ``Z = S W``.
One eigendecomposition per matrix (:func:`eigenbasis`) serves every (rank, keep) candidate (:func:`factorize`).
It is taken on the smaller side of ``Z``: for ``d_in > d_out`` (``down_proj``) the ``d_out x d_out`` problem
``Z^T Z = Q L Q^T`` gives the basis ``B = Z Q L^-1/2`` (see :func:`eigenbasis`).
"""
from __future__ import annotations

import dataclasses
import math

import torch

NULL_REL = 1e-12     # dual eigenbasis: eigenvalues <= NULL_REL * largest count as zero (their columns are completed)
ORTHO_TOL = 1e-8     # dual eigenbasis: max |B^T B - I| allowed as is (else QR), and after the QR (else the d_in side)


@dataclasses.dataclass
class Eigenbasis:
    w: torch.Tensor            # d_in x d_out
    z: torch.Tensor            # S W
    s: torch.Tensor            # S (upper whitening factor)
    s_inv: torch.Tensor        # S^-1 (upper)
    basis: torch.Tensor        # B: d_in x min(d_in, d_out) orthonormal eigenvectors of Z Z^T, eigenvalue decreasing
    coeffs: torch.Tensor       # B^T Z (min(d_in, d_out) x d_out; rank r uses the first r rows)
    orig_norms: torch.Tensor   # ||S^-1 b_i||_2
    eigvals: torch.Tensor
    w_norm: float
    z_norm: float
    u_basis: torch.Tensor | None = None   # S^-1 B (the dense candidates' U); None: computed per candidate
    s_inv_z: torch.Tensor | None = None   # S^-1 Z (= W unless Z was overridden); None: U = S^-1 D per candidate

    @property
    def max_rank(self) -> int:
        return min(self.w.shape)

    def to(self, dtype: torch.dtype) -> "Eigenbasis":
        conv = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in conv.items():
            if isinstance(v, torch.Tensor):
                conv[k] = v.to(dtype)
        return Eigenbasis(**conv)


def _eigh_desc(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(a)
    order = torch.argsort(evals, descending=True)
    return evals[order].clamp_min(0), evecs[:, order].contiguous()


def _complement(b: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` orthonormal columns orthogonal to the orthonormal columns of ``b`` (deterministic)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b.shape[0], m, generator=g, dtype=b.dtype).to(b.device)
    for _ in range(2):                       # project twice: classical Gram-Schmidt is orthogonal only after two
        x = x - b @ (b.t() @ x)
    return torch.linalg.qr(x).Q


def basis_in_side(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, eigvals)`` from the ``d_in x d_in`` eigendecomposition of ``Z Z^T``, first ``min(d_in, d_out)`` kept."""
    evals, evecs = _eigh_desc(z @ z.t())
    k = min(z.shape)
    return evecs[:, :k].contiguous(), evals[:k].contiguous()


def basis_out_side(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, eigvals)`` from the ``d_out x d_out`` eigendecomposition ``Z^T Z = Q L Q^T`` (for ``d_in >= d_out``).

    ``B = Z Q L^-1/2`` on the eigenvalues above ``NULL_REL`` times the largest; the columns of the (numerically)
    zero eigenvalues, which only rank-deficient ``Z`` has, are completed by any orthonormal directions orthogonal to
    the others (their coefficients ``B^T Z`` are ~0, as on the d_in side where that null space is arbitrary too).
    Eigenvalues of ``Z^T Z`` are as accurate as those of ``Z Z^T`` (absolute error ~eps * l_max); ``B`` loses
    orthogonality like ``eps * l_max / l_i`` and is then re-orthonormalized by a QR in eigenvalue order. None when
    ``B`` is still not orthonormal to ``ORTHO_TOL`` (the caller falls back to the d_in side).
    """
    d_in, d_out = z.shape
    if d_in < d_out:
        raise ValueError(f"basis_out_side needs d_in >= d_out, got {d_in} x {d_out}")
    evals, q = _eigh_desc(z.t() @ z)
    top = float(evals[0]) if d_out else 0.0
    n = int((evals > NULL_REL * top).sum()) if top > 0 else 0
    b = z @ (q[:, :n] / evals[:n].sqrt())
    if n < d_out:
        extra = _complement(b, d_out - n)
        energy = (extra.t() @ z).pow(2).sum(1)          # ~0: the Rayleigh quotients of the completed columns
        order = torch.argsort(energy, descending=True)
        b = torch.cat([b, extra[:, order]], dim=1)
        evals = torch.cat([evals[:n], energy[order]])
    eye = torch.eye(d_out, dtype=b.dtype, device=b.device)
    if not bool(torch.isfinite(b).all()):
        return None
    if float((b.t() @ b - eye).abs().max()) > ORTHO_TOL:
        # Ill-conditioned Z (e.g. fewer calibration tokens than d_in: a jittered Gram): (B^T B - I)_ij ~
        # eps * l_max / sqrt(l_i l_j). Re-orthonormalize in eigenvalue order (Householder QR keeps span(b_1..b_r)
        # for every r, so the leading columns barely move); the coefficients B^T Z are recomputed from this B.
        qb, rb = torch.linalg.qr(b)
        sign = torch.sign(torch.diagonal(rb))
        b = qb * torch.where(sign == 0, torch.ones_like(sign), sign)[None, :]
        if float((b.t() @ b - eye).abs().max()) > ORTHO_TOL:
            return None
    return b.contiguous(), evals


def eigenbasis(w: torch.Tensor, s: torch.Tensor, s_inv: torch.Tensor | None = None,
               z: torch.Tensor | None = None, side: str = "auto") -> Eigenbasis:
    """Everything that does not depend on (rank, keep), in float64. ``z`` overrides the whitened target
    ``S W`` (error propagation, :mod:`.propagate`: ``Z = S_c^-T X_c^T X_d W``). ``side``: ``auto`` takes the
    eigendecomposition on the smaller side (:func:`basis_out_side` for ``d_in > d_out``, falling back to
    :func:`basis_in_side`); ``in`` / ``out`` force one (tests, benchmarks)."""
    if side not in ("auto", "in", "out"):
        raise ValueError(f"side must be auto, in or out, got {side!r}")
    w64 = w.to(torch.float64)
    s64 = s.to(torch.float64)
    if s_inv is None:
        from .whitening import inverse_upper
        s_inv = inverse_upper(s64)
    s_inv = s_inv.to(torch.float64)
    s_inv_z = w64 if z is None else None
    z = s64 @ w64 if z is None else z.to(torch.float64)
    d_in, d_out = z.shape
    got = None
    if side == "out" or (side == "auto" and d_in > d_out):
        got = basis_out_side(z)
        if got is None and side == "out":
            raise ValueError("the d_out-side eigenbasis is not orthonormal to ORTHO_TOL; use side='in'")
    basis, evals = got if got is not None else basis_in_side(z)
    coeffs = basis.t() @ z
    u_basis = s_inv @ basis
    orig_norms = torch.linalg.vector_norm(u_basis, dim=0)
    if s_inv_z is None:
        s_inv_z = s_inv @ z
    return Eigenbasis(w64, z, s64, s_inv, basis, coeffs, orig_norms, evals,
                      float(torch.linalg.matrix_norm(w64)), float(torch.linalg.matrix_norm(z)), u_basis, s_inv_z)


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
    absc = c.abs().t().contiguous()          # d_out x r: each column's choice along a contiguous row (2x faster)
    delta = min(keep - 1, int(round(oversparsify * r)))
    importance = absc * orig_norms[:r].pow(lam)
    mask = torch.zeros_like(absc, dtype=torch.bool)
    mask.scatter_(1, torch.topk(importance, keep - delta, dim=1, sorted=False).indices, True)
    if delta > 0:
        # With a per-column cap of `keep` and a total of keep * d_out, every column takes exactly `delta` more:
        # the global ranking reduces to the best `delta` dropped entries of each column.
        orig_score = (absc * orig_norms[:r]).masked_fill_(mask, -1.0)
        mask.scatter_(1, torch.topk(orig_score, delta, dim=1, sorted=False).indices, True)
    return mask.t().contiguous()


def _ridge_chol(v: torch.Tensor, ridge_rel: float) -> torch.Tensor:
    """Cholesky factor of ``V V^T + mu I``, ``mu = max(1e-6, ridge_rel * tr(V V^T) / r)``."""
    r = v.shape[0]
    q = v @ v.t()
    mu = max(1e-6, ridge_rel * float(torch.trace(q)) / r)
    return torch.linalg.cholesky(q + mu * torch.eye(r, dtype=q.dtype, device=q.device))


def _solve_right(p: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X Q = P`` for ``Q = chol chol^T`` (symmetric positive definite)."""
    return torch.cholesky_solve(p.t(), chol).t()


def ridge_refit(z: torch.Tensor, v: torch.Tensor, ridge_rel: float = 1e-3) -> torch.Tensor:
    """Dictionary ``D = Z V^T (V V^T + mu I)^-1`` with ``mu = max(1e-6, ridge_rel * tr(V V^T) / r)``."""
    return _solve_right(z @ v.t(), _ridge_chol(v, ridge_rel))


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
    d_in, d_out = eb.z.shape
    u = None
    if keep == rank or not refit:
        d = eb.basis[:, :rank]          # dense V: the truncated whitened SVD is already least-squares optimal
        if eb.u_basis is not None:
            u = eb.u_basis[:, :rank]
    else:
        chol = _ridge_chol(v, ridge_rel)
        d = _solve_right(eb.z @ v.t(), chol)
        if refit_rounds > 0:
            from .refit import alternate_refit
            d, v, _ = alternate_refit(eb.z, d, v, mask, refit_rounds, ridge_rel)
        elif eb.s_inv_z is not None and d_out + rank < d_in:
            # U = S^-1 Z V^T (V V^T + mu I)^-1: d_in (d_out + r) r flops instead of d_in^2 r for S^-1 D
            u = _solve_right(eb.s_inv_z @ v.t(), chol)
    resid = torch.addmm(eb.z, d, v, alpha=-1)          # Z - D V in one pass
    col_sq = resid.pow(2).sum(0)
    whitened_sq = float(col_sq.sum())
    if u is None:
        u = eb.s_inv @ d
    rel_orig = float(torch.linalg.matrix_norm(torch.addmm(eb.w, u, v, alpha=-1))) / max(eb.w_norm, 1e-30)
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
