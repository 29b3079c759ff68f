"""Error-propagating materialisation: fit each block's layers to the inputs the compressed model really feeds them.

The profile (and so the allocation) uses the dense model's activations. Here, with the allocation fixed, the
calibration tokens run through the model once more: block ``b`` of the dense model is fed both the dense hidden
states ``h_d`` and those of the already-compressed blocks ``0..b-1``, ``h_c``. For a layer with dense input
``X_d`` and compressed-path input ``X_c`` (same tokens) the target is the dense output ``X_d W``:

    min_W' ||X_c W' - X_d W||_F^2 = ||S W' - Z||_F^2 + const,   S^T S = G_c = X_c^T X_c,   Z = S^-T X_c^T X_d W

(expand both sides: the cross term is ``2 tr(W'^T X_c^T X_d W)`` either way). So the ROCKET factorization runs
unchanged on ``(S, Z)`` at the allocated (rank, keep). Inside a block every layer sees the dense block's inputs
on ``h_c`` (the cheaper variant: errors of earlier layers of the same block are not propagated).
Cost: three block forwards per calibration batch and one eigendecomposition per compressed layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from rocket_deploy.config import RocketConfig
from rocket_deploy.targets import block_targets, find_blocks, select_targets

from .calibration import capture_block_inputs
from .factorize import eigenbasis, factorize
from .whitening import damped_gram, inverse_upper, whitening_factor


def propagated_target(g_c: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, damping: float = 0.0):
    """``(S, S^-1, Z, jitter)`` for ``G_c`` (= X_c^T X_c), ``cross`` (= X_c^T X_d) and ``W`` (d_in x d_out), all per
    token; ``Z = S^-T cross W`` (see the module docstring). Damping adds ``damping * mean(diag G_c) I``."""
    s, jitter = whitening_factor(damped_gram(g_c, damping))
    s_inv = inverse_upper(s)
    z = torch.linalg.solve_triangular(s.t(), cross.to(torch.float64) @ w.to(torch.float64), upper=False)
    return s, s_inv, z, jitter


class _InputCapture:
    """Forward hooks keeping the latest input of the named linears (one batch at a time)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears, self.x, self._h = linears, {}, []

    def __enter__(self):
        for name, mod in self.linears.items():
            self._h.append(mod.register_forward_hook(lambda _m, a, _o, n=name: self.x.__setitem__(n, a[0].detach())))
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()
        self._h.clear()


def _out(o):
    return (o[0] if isinstance(o, (tuple, list)) else o).detach()


@torch.no_grad()
def materialize_propagated(model: nn.Module, profile, choice: dict, config: RocketConfig, calib_ids: torch.Tensor,
                           batch_size: int = 8, inplace: bool = False) -> tuple[nn.Module, dict]:
    """Like :func:`.pipeline.materialize` (same records, same rounding), with propagated inputs."""
    from .pipeline import keep_dense, layer_record, place_factorization, round_untouched
    from .profile import weight_in_out
    comp = model if inplace else copy.deepcopy(model)
    dense = copy.deepcopy(model) if inplace else model
    t_d = select_targets(dense, config.targets, config.exclude)
    t_c = select_targets(comp, config.targets, config.exclude)
    prefix, blocks_d = find_blocks(dense, t_d)
    _, blocks_c = find_blocks(comp, t_c)
    device = next(dense.parameters()).device
    batches = [calib_ids[i:i + batch_size] for i in range(0, calib_ids.shape[0], batch_size)]
    inp = capture_block_inputs(dense, blocks_d[0], iter(batches), device)
    h_d, h_c = list(inp.hidden), list(inp.hidden)
    records = {}
    for bi in range(len(blocks_d)):
        lin_d = {n: m for n, m in block_targets(prefix, bi, t_d).items() if n in profile.layers}
        groups = {profile.layers[n].group for n in lin_d if choice.get(n) is not None}
        gc, cr, ntok = {}, {}, {}
        for j in range(len(h_d)):
            a, kw = inp.args[j], inp.kwargs[j]
            with _InputCapture({g: lin_d[g] for g in groups}) as cap:
                blocks_d[bi](h_c[j], *a, **kw)
                xc = {g: cap.x[g].reshape(-1, cap.x[g].shape[-1]).double() for g in groups}
                h_d[j] = _out(blocks_d[bi](h_d[j], *a, **kw))
                for g in groups:
                    xd = cap.x[g].reshape(-1, cap.x[g].shape[-1]).double()
                    gc[g] = gc.get(g, 0) + xc[g].t() @ xc[g]
                    cr[g] = cr.get(g, 0) + xc[g].t() @ xd
                    ntok[g] = ntok.get(g, 0) + xd.shape[0]
        targets_factors = {g: None for g in groups}
        for name in lin_d:
            lp, opt = profile.layers[name], choice.get(name)
            rec = layer_record(lp)
            if opt is None:
                rec.update(keep_dense(t_c[name], lp, config))
            else:
                g = lp.group
                if targets_factors[g] is None:
                    targets_factors[g] = (gc[g].cpu() / ntok[g], cr[g].cpu() / ntok[g])
                w = weight_in_out(t_d[name]).cpu()
                s, s_inv, z, _ = propagated_target(*targets_factors[g], w, config.gram_damping)
                eb = eigenbasis(w, s, s_inv, z=z)
                f = factorize(eb, opt.rank, opt.keep, config.importance_lambda, config.oversparsify,
                              config.ridge_rel, refit_rounds=config.refit_rounds)
                rec.update(place_factorization(comp, name, t_c[name], lp, f, eb, config))
                rec["propagated"] = True
            records[name] = rec
        h_c = [_out(blocks_c[bi](h_c[j], *inp.args[j], **inp.kwargs[j])) for j in range(len(h_c))]
    for name in profile.layers:             # target layers outside the blocks (none today): as materialize does
        if name not in records:
            raise ValueError(f"error_propagation: layer {name} is not inside the model's blocks")
    round_untouched(comp, config)
    return comp, records
