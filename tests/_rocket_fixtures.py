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


def random_sparse_v(r: int, d_out: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random V (r x d_out) that keeps ``k`` random rows in every column: ``(V * keep, keep)``."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(r, d_out, generator=g)
    keep = torch.zeros(r, d_out, dtype=torch.bool)
    for j in range(d_out):
        keep[torch.randperm(r, generator=g)[:k], j] = True
    return v * keep, keep


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


def quantize_rocketized(model: torch.nn.Module, records: dict, scheme: str, group: int = 128,
                        dense_every: int = 5, v_bits: int = 8) -> dict:
    """Turn a :func:`rocketize` d model into a format-version-2 one: every RocketLinear becomes a QuantRocketLinear
    (factors quantized with ``scheme``; whitening = identity), and every ``dense_every``-th targeted layer a
    QuantDenseLinear of its (factorized) weight, so both quantized module types are covered. Updates ``records``."""
    from rocket_deploy.compress.quantize import quantize_dense, quantize_factors, u_format, v_format
    from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
    from rocket_deploy.sparse_format import unpack_bits
    with torch.no_grad():
        for i, name in enumerate(sorted(records)):
            rec = records[name]
            lin = model.get_submodule(name)
            u = lin.u.double()
            keep_mask = unpack_bits(lin.v_mask, lin.rank).t() if not lin.is_dense_v else \
                torch.ones(lin.rank, lin.out_features, dtype=torch.bool)
            v = lin.dense_v().double()
            eye = torch.eye(rec["d_in"], dtype=torch.float64)
            bias = lin.bias.detach().half() if lin.bias is not None else None
            g = group if scheme == "int4" else None
            if dense_every and i % dense_every == dense_every - 1:
                qm = quantize_dense(u @ v, eye, scheme, group, ratios=(1.0,))
                new = QuantDenseLinear.from_quantized(qm, bias)
                rec.update(kind="dense", rank=None, keep=None,
                           quant={"scheme": scheme, "w": u_format(scheme), "group_size": g})
            else:
                qf = quantize_factors(u, v, keep_mask, eye, scheme, group, u_metric="diag", v_metric="diag",
                                      ratios=(1.0,), v_bits=v_bits)   # plain max scaling: fast, enough for export tests
                new = QuantRocketLinear.from_quantized(qf, rec["d_in"], rec["d_out"], bias)
                rec.update(quant={"scheme": scheme, "u": u_format(scheme), "v": v_format(scheme, v_bits),
                                  "group_size": g})
            set_module(model, name, new)
    return records


def make_quant_artifact(model: torch.nn.Module, tokenizer, out: str, scheme: str, group: int = 128,
                        overwrite: bool = False, records: dict | None = None, v_bits: int = 8) -> str:
    """A small format-version-2 (``--quantize``) artifact without calibration: :func:`rocketize` (skipped when
    ``records`` of an already rocketized ``model`` are given) + :func:`quantize_rocketized`."""
    import copy
    records = quantize_rocketized(model, copy.deepcopy(records) if records else rocketize(model), scheme, group,
                                  v_bits=v_bits)
    manifest = {"method": "rocket", "storage_dtype": "float16", "layers": records,
                "config": {"quantize": scheme, "quant_group_size": group, "quant_v_bits": v_bits},
                "budget": {"target_removed_fraction": 0.5}, "source": {}}
    return save_artifact(out, model, tokenizer, manifest, overwrite=overwrite)
