"""Math units of the ROCKET engine: whitening, factorization, sparsification, candidates."""
import math

import pytest
import torch

from rocket_deploy.compress.candidates import candidate_grid, fit_rank
from rocket_deploy.compress.factorize import balance_factors, eigenbasis, factorize, select_keep_mask
from rocket_deploy.compress.whitening import damped_gram, gram, inverse_upper, whitening_factor
from rocket_deploy.sparse_format import factor_bytes


def _problem(d_in=48, d_out=40, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated, anisotropic activations with a few outlier channels, as in LLMs.
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 30
    w = torch.randn(d_in, d_out, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    return x, w


def test_whitening_matches_activation_error():
    x, w = _problem()
    s, jitter = whitening_factor(x.t() @ x)
    assert jitter == 0.0
    assert torch.allclose(s.t() @ s, x.t() @ x, rtol=1e-9, atol=1e-6)
    assert torch.equal(s, torch.triu(s))
    dw = torch.randn_like(w)
    assert math.isclose(float(torch.linalg.matrix_norm(x @ dw)), float(torch.linalg.matrix_norm(s @ dw)), rel_tol=1e-9)
    assert torch.allclose(inverse_upper(s) @ s, torch.eye(s.shape[0], dtype=s.dtype), atol=1e-8)


def test_damped_whitening_adds_plain_weight_error():
    """With damping c, ||S dW||^2 = ||X dW||^2 + c * mean(diag(X^T X)) * ||dW||^2 exactly."""
    x, w = _problem()
    gram = x.t() @ x
    assert torch.equal(damped_gram(gram, 0.0), gram)
    c = 0.05
    s, _ = whitening_factor(damped_gram(gram, c))
    dw = torch.randn_like(w)
    expect = float((x @ dw).square().sum()) + c * float(torch.diagonal(gram).mean()) * float(dw.square().sum())
    assert math.isclose(float((s @ dw).square().sum()), expect, rel_tol=1e-9)


def test_gram_damping_is_validated():
    from rocket_deploy.config import RocketConfig
    assert RocketConfig(gram_damping=0.01).gram_damping == 0.01
    with pytest.raises(ValueError, match="gram_damping"):
        RocketConfig(gram_damping=-0.1)


def test_whitening_jitter_on_singular_gram():
    x, _ = _problem()
    x[:, 5] = 0.0                 # a dead input feature: the Gram is singular
    x[:, 7] = x[:, 8]
    s, jitter = whitening_factor(x.t() @ x)
    assert jitter > 0
    assert torch.isfinite(s).all()


def test_dense_truncation_is_optimal_whitened_svd():
    x, w = _problem()
    s, _ = whitening_factor(x.t() @ x)
    eb = eigenbasis(w, s)
    r = 10
    f = factorize(eb, r, r, refit=False)
    # Eckart-Young: the whitened error is the tail energy of Z's spectrum.
    assert math.isclose(f.whitened_sq, float(eb.eigvals[r:].sum()), rel_tol=1e-6)
    assert math.isclose(f.whitened_sq, float((x @ (w - f.u @ f.v)).pow(2).sum()), rel_tol=1e-6)


def test_error_falls_as_rank_grows():
    x, w = _problem()
    s, _ = whitening_factor(x.t() @ x)
    eb = eigenbasis(w, s)
    dense_errs = [factorize(eb, r, r).whitened_sq for r in (4, 8, 16, 24, 32, 40)]
    assert all(a > b for a, b in zip(dense_errs, dense_errs[1:]))
    assert dense_errs[-1] < 1e-12 * float(eb.z_norm ** 2) + 1e-9   # full rank is exact
    sparse_errs = [factorize(eb, r, r // 2).whitened_sq for r in (8, 16, 24, 32, 40)]
    assert all(a > b for a, b in zip(sparse_errs, sparse_errs[1:]))


def test_refit_does_not_hurt():
    x, w = _problem()
    s, _ = whitening_factor(x.t() @ x)
    eb = eigenbasis(w, s)
    for r, k in ((16, 8), (24, 8), (32, 16)):
        assert factorize(eb, r, k, refit=True).whitened_sq <= factorize(eb, r, k, refit=False).whitened_sq * 1.0001


@pytest.mark.parametrize("keep", [1, 5, 11, 20])
def test_keep_mask_exact_per_column(keep):
    c = torch.randn(20, 33, dtype=torch.float64)
    norms = torch.rand(20, dtype=torch.float64) + 0.1
    m = select_keep_mask(c, norms, keep, oversparsify=0.1)
    assert (m.sum(dim=0) == keep).all()
    assert int(m.sum()) == keep * 33          # the budget of kept entries is met exactly


def test_keep_mask_prefers_dual_space_importance():
    c = torch.tensor([[1.0], [0.9], [0.1]], dtype=torch.float64)
    norms = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)   # row 1 maps to a long original-space vector
    m = select_keep_mask(c, norms, 1, lam=0.5, oversparsify=0.0)
    assert m[:, 0].tolist() == [False, True, False]            # 0.9*2 > 1.0*1
    m = select_keep_mask(c, norms, 1, lam=0.0, oversparsify=0.0)
    assert m[:, 0].tolist() == [True, False, False]            # whitened-only score


def test_balance_preserves_product():
    u = torch.randn(30, 8, dtype=torch.float64) * 1e-3
    v = torch.randn(8, 20, dtype=torch.float64) * 1e4
    u2, v2 = balance_factors(u, v)
    assert torch.allclose(u2 @ v2, u @ v, rtol=1e-12, atol=1e-9)
    assert torch.allclose(u2.abs().amax(0), v2.abs().amax(1), rtol=1e-9)


def test_candidate_grid_fits_bytes():
    for d_in, d_out in ((576, 576), (576, 192), (1536, 576), (576, 1536)):
        dense = d_in * d_out * 2
        grid = candidate_grid(d_in, d_out, (0.2, 0.5, 0.8), (1.0, 0.5, 1 / 3), 8)
        assert grid
        for c in grid:
            assert c.rank % 8 == 0 and c.rank <= min(d_in, d_out)
            assert c.bytes < dense and c.bytes == factor_bytes(d_in, d_out, c.rank, c.keep)
            assert c.keep == c.rank or c.keep < c.rank
        r, k = fit_rank(d_in, d_out, 0.5 * dense, 0.5, 8)
        assert factor_bytes(d_in, d_out, r, k) <= 0.5 * dense < factor_bytes(d_in, d_out, r + 8, round(0.5 * (r + 8)))


@pytest.mark.parametrize("n,d", [(50, 5), (300, 128), (200, 800), (2048, 576), (64, 1536), (30, 1537)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_gram_equals_the_full_product(n, d, dtype):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64).to(dtype)
    g = gram(x)
    ref = x.double().t() @ x.double()
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert g.dtype == dtype and torch.equal(g, g.t())
    assert float((g.double() - ref).abs().max()) <= tol * float(ref.abs().max())
