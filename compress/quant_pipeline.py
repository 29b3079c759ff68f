"""The ``--quantize`` hooks of the pipeline: quantized candidate grids and errors for the profile, quantized
dense options, and materialisation of quantized layers (see docs/quantization.md)."""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.config import RocketConfig
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
from rocket_deploy.sparse_format import dense_weight_bytes, factor_params
from rocket_deploy.targets import set_module

from .factorize import Eigenbasis, Factorization, factorize
from .quantize import (bytes_fn, error_stats, factor_error_stats, quant_dense_bytes, quantize_dense,
                       quantize_factors, u_format, v_format)

# Clip-ratio search metrics used while profiling and materialising (the recorded errors are always exact):
# the diagonal of H for U's columns and of U_q^T H U_q for V's columns keep profiling within ~2x of unquantized.
U_METRIC = "diag"
V_METRIC = "diag"
DENSE_METRIC = "exact"


def quant_bytes_fn(config: RocketConfig):
    """``bytes_fn(d_in, d_out, rank, keep)`` of the configured storage (fp16 when not quantized)."""
    return bytes_fn(config.quantize, config.quant_group_size)


def quant_fractions(config: RocketConfig, d_in: int, d_out: int) -> tuple[float, ...]:
    """The profiled byte fractions, relative to the layer's dense weight *quantized the same way* (so a grid of
    0.2..0.9 spans ranks up to ~0.9 of the quantized dense bytes), expressed as fractions of the fp16 dense bytes
    that :func:`compress.candidates.candidate_grid` multiplies."""
    if not config.quantize:
        return tuple(config.byte_fractions)
    rel = quant_dense_bytes(d_in, d_out, config.quantize, config.quant_group_size) / dense_weight_bytes(d_in, d_out)
    return tuple(f * rel for f in config.byte_fractions)


def _fisher(col_sq: torch.Tensor, sensitivity: torch.Tensor | None) -> float:
    return 0.0 if sensitivity is None else float(col_sq.to(torch.float64) @ sensitivity.to(torch.float64))


def quantize_factorization(eb: Eigenbasis, f: Factorization, config: RocketConfig):
    return quantize_factors(f.u, f.v, f.keep_mask, eb.s, config.quantize, config.quant_group_size,
                            u_metric=U_METRIC, v_metric=V_METRIC)


def quantized_option(eb: Eigenbasis, f: Factorization, config: RocketConfig, sensitivity=None):
    """The :class:`LayerOption` of a candidate with its factors quantized: quantized bytes (scales included) and
    the exact whitened / original / fisher errors of ``U_q V_q``."""
    from .profile import LayerOption
    d_in, d_out = eb.w.shape
    qf = quantize_factorization(eb, f, config)
    st = factor_error_stats(eb.w, qf, eb.s, eb.z, eb.z_norm)
    return LayerOption(f.rank, f.keep, qf.bytes(d_in, d_out), factor_params(d_in, d_out, f.rank, f.keep),
                       st.rel_original, st.rel_whitened, st.whitened_sq, _fisher(st.col_sq, sensitivity))


def quant_dense_option(w: torch.Tensor, s: torch.Tensor, config: RocketConfig, sensitivity=None):
    """The dense option of a layer under ``--quantize``: its weight quantized per output channel (int8 / fp8) or
    group-wise (int4), with the measured error (not 0). ``rank == 0`` marks it dense."""
    from .profile import LayerOption
    w = w.to(torch.float32)
    s = s.to(torch.float32)
    qm = quantize_dense(w, s, config.quantize, config.quant_group_size, metric=DENSE_METRIC)
    st = error_stats(w, qm.deq, s)
    return LayerOption(0, 0, qm.bytes, w.shape[0] * w.shape[1], st.rel_original, st.rel_whitened, st.whitened_sq,
                       _fisher(st.col_sq, sensitivity))


def quant_record(config: RocketConfig, kind: str) -> dict:
    """The ``quant`` entry of a layer record in rocket.json."""
    if kind == "dense":
        return {"scheme": config.quantize, "w": u_format(config.quantize), "group_size": config.quant_group_size
                if config.quantize == "int4" else None}
    return {"scheme": config.quantize, "u": u_format(config.quantize), "v": v_format(config.quantize),
            "group_size": config.quant_group_size if config.quantize == "int4" else None}


def materialize_quant_layer(model: nn.Module, name: str, lin: nn.Linear, eb: Eigenbasis, opt, config: RocketConfig,
                            sensitivity=None) -> dict:
    """Replace ``lin`` by its quantized form (``opt`` None: dense weight quantized; else quantized ROCKET factors
    at ``opt.rank, opt.keep``), computed in float64 exactly as deployed. Returns the layer record fields."""
    storage = getattr(torch, config.storage_dtype)
    bias = lin.bias.detach().to(storage).cpu() if lin.bias is not None else None
    w, s = eb.w, eb.s
    d_in, d_out = w.shape
    if opt is None:
        qm = quantize_dense(w, s, config.quantize, config.quant_group_size, metric=DENSE_METRIC)
        st = error_stats(w, qm.deq.to(w.dtype), s, eb.z_norm)
        new = QuantDenseLinear.from_quantized(qm, bias)
        rec = dict(kind="dense", rank=None, keep=None, bytes=qm.bytes, params=d_in * d_out)
    else:
        f = factorize(eb, opt.rank, opt.keep, config.importance_lambda, config.oversparsify, config.ridge_rel,
                      refit=config.method != "svd-llm")
        qf = quantize_factorization(eb, f, config)
        st = factor_error_stats(w, qf, s, eb.z, eb.z_norm)
        new = QuantRocketLinear.from_quantized(qf, d_in, d_out, bias)
        rec = dict(kind="rocket", rank=f.rank, keep=f.keep, bytes=qf.bytes(d_in, d_out),
                   params=factor_params(d_in, d_out, f.rank, f.keep))
    set_module(model, name, new.to(lin.weight.device))
    rec.update(rel_original=st.rel_original, rel_whitened=st.rel_whitened, whitened_sq=st.whitened_sq,
               quant=quant_record(config, rec["kind"]))
    return rec
