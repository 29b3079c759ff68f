"""Refitting both ROCKET factors in the whitened space (pure math, no hooks, no I/O).

Public API (also for the quantization path: refit V to a quantized dictionary):

    refit_v_on_support(zw, d, keep_mask, ridge=1e-6) -> v
        zw: whitened target ``Z = S W`` (d_in x d_out); d: whitened dictionary ``D = S U`` (d_in x r);
        keep_mask: bool r x d_out, the same number k of kept rows in every column. Returns V (r x d_out, zero
        outside the mask) with each column solving ``min_v ||Z_j - D_T v||^2 + mu ||v||^2`` on its support T_j:
        the batched k x k systems ``(D_T^T D_T + mu I) v = D_T^T Z_j``, mu = ridge * mean(diag D^T D).

    alternate_refit(zw, d, v, keep_mask, rounds, ridge_rel=1e-3, ridge_v=1e-6) -> (d, v, errors)
        ``rounds`` alternations of the V step above and the closed-form dictionary step
        ``D = Z V^T (V V^T + mu I)^-1`` (:func:`.factorize.ridge_refit`); the mask (the sparse pattern) stays
        fixed. Returns the pair with the lowest whitened error ``||Z - D V||_F^2`` seen (the start included, so it
        never gets worse) and that error after every round (``errors[0]`` the start).
"""
from __future__ import annotations

import torch

from .factorize import ridge_refit
from .quant_refit import refit_v_on_support as _support_least_squares

V_RIDGE = 1e-6


def refit_v_on_support(zw: torch.Tensor, d: torch.Tensor, keep_mask: torch.Tensor, ridge: float = V_RIDGE,
                       v0: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares V on a fixed support for a fixed whitened dictionary ``d`` (see the module docstring;
    ``v0``, the current V, starts the iterative solve of :mod:`.quant_refit`)."""
    if zw.shape[0] != d.shape[0] or keep_mask.shape != (d.shape[1], zw.shape[1]):
        raise ValueError(f"refit_v_on_support: shapes do not match (Z {tuple(zw.shape)}, D {tuple(d.shape)}, "
                         f"mask {tuple(keep_mask.shape)}); expected Z d_in x d_out, D d_in x r, mask r x d_out")
    return _support_least_squares(d, zw, keep_mask, ridge, v0=v0)


def whitened_sq_error(zw: torch.Tensor, d: torch.Tensor, v: torch.Tensor) -> float:
    return float((zw - d @ v).pow(2).sum())


def alternate_refit(zw: torch.Tensor, d: torch.Tensor, v: torch.Tensor, keep_mask: torch.Tensor, rounds: int,
                    ridge_rel: float = 1e-3, ridge_v: float = V_RIDGE) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternate V-on-support and dictionary refits ``rounds`` times (see the module docstring)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    best = (whitened_sq_error(zw, d, v), d, v)
    errors = [best[0]]
    for _ in range(rounds):
        v = refit_v_on_support(zw, d, keep_mask, ridge_v, v0=v)
        d = ridge_refit(zw, v, ridge_rel)
        err = whitened_sq_error(zw, d, v)
        errors.append(err)
        if err < best[0]:
            best = (err, d, v)
    return best[1], best[2], errors
