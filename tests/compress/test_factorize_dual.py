"""The eigenbasis taken on the smaller side of Z (d_out x d_out for d_in > d_out) gives the same candidates
as the d_in-side eigh: errors, masks and factors, on full-rank, rank-deficient and zero weights (float64)."""
import dataclasses

import pytest
import torch

from rocket_deploy.compress import factorize as fz
from rocket_deploy.compress.candidates import candidate_grid
from rocket_deploy.compress.factorize import eigenbasis, factorize
from rocket_deploy.compress.whitening import inverse_upper, whitening_factor

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 0.9)
KEEPS = (1.0, 2 / 3, 1 / 2, 1 / 3)
TOL = 1e-9


def _whitening(d_in: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d_in, d_in, generator=g, dtype=torch.float64)
    x = x * (0.1 + 3 * torch.rand(d_in, generator=g, dtype=torch.float64))    # anisotropic input channels
    s, _ = whitening_factor(x.t() @ x / x.shape[0])
    return s, inverse_upper(s)


def _weight(d_in: int, d_out: int, rank: int | None, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if rank is None:
        return torch.randn(d_in, d_out, generator=g, dtype=torch.float64) * 0.05
    if rank == 0:
        return torch.zeros(d_in, d_out, dtype=torch.float64)
    a = torch.randn(d_in, rank, generator=g, dtype=torch.float64)
    return a @ torch.randn(rank, d_out, generator=g, dtype=torch.float64) * 0.01


def _candidates(d_in, d_out):
    cands = [(c.rank, c.keep) for c in candidate_grid(d_in, d_out, FRACTIONS, KEEPS, 4)]
    k = min(d_in, d_out)
    return sorted(set(cands) | {(k, k), (k, k // 2), (1, 1), (2, 1)})


# (d_in, d_out, rank of W: None full, 0 zero)
SHAPES = [(96, 40, None), (40, 96, None), (64, 64, None), (120, 24, None),
          (96, 40, 12), (64, 64, 20), (40, 96, 10), (96, 40, 0)]


def _assert_orthonormal(b: torch.Tensor, tol: float = 1e-10):
    assert float((b.t() @ b - torch.eye(b.shape[1], dtype=b.dtype)).abs().max()) < tol


@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
def test_smaller_side_matches_din_side(d_in, d_out, rank):
    s, s_inv = _whitening(d_in, seed=d_in + d_out)
    w = _weight(d_in, d_out, rank, seed=d_out)
    ref = eigenbasis(w, s, s_inv, side="in")
    eb = eigenbasis(w, s, s_inv)
    k = min(d_in, d_out)
    for e in (ref, eb):       # every consumer's shapes: rank <= min(d_in, d_out) rows/columns
        assert e.basis.shape == (d_in, k) and e.coeffs.shape == (k, d_out)
        assert e.orig_norms.shape == (k,) and e.eigvals.shape == (k,) and e.max_rank == k
        _assert_orthonormal(e.basis)
    scale = float(eb.eigvals[0]) if rank != 0 else 1.0
    assert float((eb.eigvals - ref.eigvals).abs().max()) <= TOL * scale
    # the profile cache keeps basis and coeffs in float32 and rebuilds Z = B C from them
    z_rec = eb.basis.float().double() @ eb.coeffs.float().double()
    assert float(torch.linalg.matrix_norm(z_rec - eb.z)) <= 1e-6 * max(eb.z_norm, 1e-30)
    m = k if rank is None else rank       # rows with a nonzero eigenvalue: beyond them the basis is arbitrary
    z_sq = max(eb.z_norm ** 2, 1e-30)
    for r, keep in _candidates(d_in, d_out):
        a, b = factorize(ref, r, keep), factorize(eb, r, keep)
        assert abs(a.whitened_sq - b.whitened_sq) <= TOL * z_sq, (r, keep)
        assert abs(a.rel_original - b.rel_original) <= TOL, (r, keep)
        assert float((a.col_sq - b.col_sq).abs().max()) <= TOL * z_sq
        rows = min(r, m)
        assert torch.equal(a.keep_mask[:rows], b.keep_mask[:rows]), (r, keep)
        if rank is None:
            assert torch.equal(a.keep_mask, b.keep_mask)
        prod_a, prod_b = a.u @ a.v, b.u @ b.v
        assert float(torch.linalg.matrix_norm(prod_a - prod_b)) <= TOL * max(eb.w_norm, 1e-30) + 1e-12, (r, keep)


@pytest.mark.parametrize("d_in,d_out,rank", SHAPES)
def test_precomputed_u_matches_s_inv_d(d_in, d_out, rank):
    """The dense candidates' U = (S^-1 B)_r and the refit U = S^-1 Z V^T (V V^T + mu I)^-1 equal S^-1 D."""
    s, s_inv = _whitening(d_in, seed=3 * d_in)
    w = _weight(d_in, d_out, rank, seed=d_in)
    eb = eigenbasis(w, s, s_inv)
    plain = dataclasses.replace(eb, u_basis=None, s_inv_z=None)     # as reloaded from a profile cache
    for r, keep in _candidates(d_in, d_out):
        a, b = factorize(plain, r, keep), factorize(eb, r, keep)
        assert torch.equal(a.keep_mask, b.keep_mask)
        assert float(torch.linalg.matrix_norm(a.u - b.u)) <= TOL * max(float(torch.linalg.matrix_norm(a.u)), 1e-30)
        assert abs(a.rel_original - b.rel_original) <= TOL
        assert a.whitened_sq == b.whitened_sq          # D is computed the same way on both paths


def test_overridden_target_both_sides():
    """Error propagation passes its own Z (not S W): both sides agree and U = S^-1 D still holds."""
    d_in, d_out = 80, 32
    s, s_inv = _whitening(d_in, seed=7)
    w = _weight(d_in, d_out, None, seed=7)
    g = torch.Generator().manual_seed(9)
    z = s @ w + 0.01 * torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    ref, eb = eigenbasis(w, s, s_inv, z=z, side="in"), eigenbasis(w, s, s_inv, z=z)
    assert torch.allclose(eb.s_inv_z, s_inv @ z)
    for r, keep in _candidates(d_in, d_out):
        a, b = factorize(ref, r, keep), factorize(eb, r, keep)
        assert abs(a.whitened_sq - b.whitened_sq) <= TOL * eb.z_norm ** 2
        assert torch.equal(a.keep_mask, b.keep_mask)
        assert float(torch.linalg.matrix_norm(b.u - s_inv @ (s @ b.u))) <= 1e-9 * float(torch.linalg.matrix_norm(b.u))
        assert abs(a.rel_original - b.rel_original) <= TOL


def test_rank_deficient_completion_is_orthogonal_null_space():
    d_in, d_out, rank = 96, 40, 12
    s, s_inv = _whitening(d_in, seed=11)
    eb = eigenbasis(_weight(d_in, d_out, rank, seed=11), s, s_inv)
    _assert_orthonormal(eb.basis)
    assert float(eb.coeffs[rank:].abs().max()) <= 1e-9 * float(eb.coeffs[:rank].abs().max())
    assert float(eb.eigvals[rank:].max()) <= 1e-12 * float(eb.eigvals[0])
    assert bool((eb.eigvals[:-1] >= eb.eigvals[1:]).all())


def test_falls_back_to_din_side_when_not_orthonormal(monkeypatch):
    d_in, d_out = 72, 24
    s, s_inv = _whitening(d_in, seed=5)
    w = _weight(d_in, d_out, None, seed=5)
    called = []
    real = fz.basis_in_side
    monkeypatch.setattr(fz, "basis_in_side", lambda z: called.append(1) or real(z))
    eigenbasis(w, s, s_inv)
    assert not called                               # the d_out side served it
    monkeypatch.setattr(fz, "ORTHO_TOL", -1.0)      # no basis passes the check now
    eb = eigenbasis(w, s, s_inv)
    assert called and eb.basis.shape == (d_in, d_out)
    with pytest.raises(ValueError, match="side='in'"):
        eigenbasis(w, s, s_inv, side="out")
    with pytest.raises(ValueError, match="side must be"):
        eigenbasis(w, s, s_inv, side="both")


def test_fewer_tokens_than_inputs_reorthonormalizes_instead_of_falling_back(monkeypatch):
    """A jittered Gram (30 tokens, d_in 96) makes Z ill-conditioned (kappa(Z^T Z) ~ 1e11): B = Z Q L^-1/2 is then
    orthonormal only to ~1e-5, the QR repairs it, and the candidates still match the d_in side."""
    d_in, d_out, ntok = 96, 40, 30
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ntok, d_in, generator=g, dtype=torch.float64)
    s, jitter = whitening_factor(x.t() @ x / ntok)
    assert jitter > 0
    s_inv = inverse_upper(s)
    w = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    z = s @ w
    evals, q = fz._eigh_desc(z.t() @ z)
    raw = z @ (q / evals.sqrt())
    assert float((raw.t() @ raw - torch.eye(d_out, dtype=raw.dtype)).abs().max()) > fz.ORTHO_TOL   # the QR is needed
    called = []
    real = fz.basis_in_side
    monkeypatch.setattr(fz, "basis_in_side", lambda z: called.append(1) or real(z))
    eb = eigenbasis(w, s, s_inv)
    assert not called
    _assert_orthonormal(eb.basis)
    ref = eigenbasis(w, s, s_inv, side="in")
    assert float((eb.eigvals - ref.eigvals).abs().max()) <= 1e-12 * float(eb.eigvals[0])
    strong = int((ref.eigvals > 1e-6 * ref.eigvals[0]).sum())      # well-determined directions
    for r, keep in _candidates(d_in, d_out):
        a, b = factorize(ref, r, keep), factorize(eb, r, keep)
        assert abs(a.whitened_sq - b.whitened_sq) <= TOL * eb.z_norm ** 2, (r, keep)
        rows = min(r, strong)
        assert torch.equal(a.keep_mask[:rows], b.keep_mask[:rows]), (r, keep)
