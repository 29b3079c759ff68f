"""Fast synthetic ROCKET artifacts for the export / runtime / bench tests (no calibration, no profile).

Every targeted linear layer becomes a RocketLinear from a truncated SVD of its weight; even layers keep V dense
(keep == rank), odd layers keep the largest half of each column (keep < rank, bitmask), so both forms are covered.
All tensors are rounded to fp16 as a real artifact stores them.
"""
from __future__ import annotations

import torch

from rocket_deploy.artifact import save_artifact
from rocket_deploy.config import DEFAULT_TARGETS, RocketConfig
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.targets import select_targets, set_module


def rocketize(model: torch.nn.Module, rank_frac: float = 0.75) -> dict:
    targets = select_targets(model, DEFAULT_TARGETS, RocketConfig().exclude)
    records = {}
    with torch.no_grad():
        for i, (name, lin) in enumerate(sorted(targets.items())):
            w = lin.weight.detach().double().t()             # d_in x d_out
            d_in, d_out = w.shape
            r = max(8, int(min(d_in, d_out) * rank_frac) // 8 * 8)
            uu, s, vh = torch.linalg.svd(w, full_matrices=False)
            u = (uu[:, :r] * s[:r].sqrt()).float().half().float()
            v = (s[:r].sqrt()[:, None] * vh[:r]).float().half().float()
            keep = r if i % 2 == 0 else r // 2
            mask = None
            if keep < r:
                idx = v.abs().topk(keep, dim=0).indices
                mask = torch.zeros_like(v, dtype=torch.bool).scatter_(0, idx, True)
            bias = lin.bias.detach().half().float() if lin.bias is not None else None
            set_module(model, name, RocketLinear.from_factors(u, v, mask, bias))
            records[name] = {"kind": "rocket", "d_in": d_in, "d_out": d_out, "rank": r, "keep": keep,
                             "has_bias": bias is not None, "dense_bytes": 2 * d_in * d_out}
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.data.copy_(t.data.half().float())
    return records


def make_artifact(model: torch.nn.Module, tokenizer, out: str) -> str:
    records = rocketize(model)
    manifest = {"method": "rocket", "storage_dtype": "float16", "layers": records,
                "budget": {"target_removed_fraction": 0.3}, "source": {}}
    return save_artifact(out, model, tokenizer, manifest)
