"""Whitening from the calibration Gram: ``S = chol(X^T X)^T`` so that ``||X dW||_F = ||S dW||_F``."""
from __future__ import annotations

import torch


class WhiteningError(RuntimeError):
    pass


def damped_gram(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``H + damping * mean(diag H) * I`` (float64): the whitened error becomes ``||X dW||^2 + c ||dW||^2``,
    which trades a little calibration-domain fidelity for robustness on inputs the calibration did not cover."""
    g = gram.to(torch.float64)
    if damping <= 0:
        return g
    return g + damping * float(torch.diagonal(g).mean()) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def whitening_factor(gram: torch.Tensor, max_tries: int = 10) -> tuple[torch.Tensor, float]:
    """Upper-triangular ``S`` with ``S^T S = gram + jitter I`` (float64).

    Tries the plain Cholesky first; on failure adds ``jitter = eps * mean(diag)`` with eps growing from 1e-10
    by factors of 10 (a Gram of rank-deficient activations, e.g. dead input features, needs a little).
    Returns ``(S, jitter)``.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.t())
    scale = float(torch.diagonal(g).mean().clamp_min(1e-30))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    jitter = 0.0
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(g + jitter * eye)
        if int(info) == 0:
            return L.t().contiguous(), jitter
        jitter = scale * 10.0 ** (attempt - 10)
    raise WhiteningError(f"Gram matrix is not positive definite even with jitter {jitter:.3g}")


def inverse_upper(s: torch.Tensor) -> torch.Tensor:
    """``S^-1`` of an upper-triangular ``S`` by a triangular solve (no general inverse)."""
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.linalg.solve_triangular(s, eye, upper=True)
