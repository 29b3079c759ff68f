"""Uniform-allocation baselines at the same bytes: ROCKET-uniform and SVD-LLM (whitened truncated SVD)."""
from __future__ import annotations

import torch

from rocket_deploy.config import RocketConfig
from rocket_deploy.sparse_format import factor_bytes, factor_params

from .allocate import option_error, resolve_objective
from .candidates import fit_rank
from .factorize import factorize, fisher_error
from .profile import LayerOption, Profile, weight_in_out


def uniform_choice(profile: Profile, targets: dict[str, torch.nn.Module], config: RocketConfig,
                   budget: float, method: str) -> dict[str, LayerOption | None]:
    """Every layer at the same byte fraction ``1 - budget``.

    ``svd-llm``: dense V (keep = rank), no refit -- the whitened truncated SVD of SVD-LLM.
    ``rocket-uniform``: ROCKET at that fraction with the best keep ratio of the grid for each layer.
    ``dense-quant``: no factorization, every layer dense with its weight quantized (``config.quantize``); the
    bytes are fixed by the scheme, not by ``budget``.
    With ``config.quantize`` ranks are fitted to the quantized sizes (the keep ratio is picked on the
    unquantized error).
    """
    if method == "dense-quant":
        return {name: None for name in profile.layers}
    frac = 1.0 - budget
    objective = resolve_objective(profile, config.objective)
    from .quant_pipeline import quant_bytes_fn
    size = quant_bytes_fn(config)
    out = {}
    for name, lp in profile.layers.items():
        ratios = (1.0,) if method == "svd-llm" else config.keep_ratios
        eb = None
        best = None
        for kr in ratios:
            fit = fit_rank(lp.d_in, lp.d_out, frac * lp.dense_bytes, kr, config.rank_multiple, size)
            if fit is None:
                continue
            r, k = fit
            if eb is None:
                eb = profile.eigenbasis(name, weight_in_out(targets[name]).cpu()).to(torch.float32)
            f = factorize(eb, r, k, config.importance_lambda, config.oversparsify, config.ridge_rel,
                          refit=method != "svd-llm")
            opt = LayerOption(r, k, size(lp.d_in, lp.d_out, r, k), factor_params(lp.d_in, lp.d_out, r, k),
                              f.rel_original, f.rel_whitened, f.whitened_sq,
                              fisher_error(f.col_sq, profile.sensitivity(name)))
            if best is None or option_error(opt, lp, objective) < option_error(best, lp, objective):
                best = opt
        if best is None:
            raise ValueError(f"layer {name} ({lp.d_in}x{lp.d_out}) cannot be compressed to {frac:.2f} of its bytes")
        out[name] = best
    return out
