"""The ``--quantize`` hooks of the pipeline: quantized candidate grids and errors for the profile, quantized
dense options, and materialisation of quantized layers (see docs/quantization.md)."""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.config import RocketConfig
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
from rocket_deploy.sparse_format import dense_weight_bytes, factor_params
from rocket_deploy.targets import set_module

from .factorize import Eigenbasis, Factorization, factorize, fisher_error
from .quantize import (bytes_fn, error_stats, factor_error_stats, quant_dense_bytes, quantize_dense,
                       quantize_factors, u_format, v_format)

# Clip-ratio search metrics used while profiling and materialising (the recorded errors are always exact):
# the diagonal of H for U's columns and of U_q^T H U_q for V's columns keep profiling within ~2x of unquantized.
U_METRIC = "diag"
V_METRIC = "diag"
DENSE_METRIC = "exact"


def quant_bytes_fn(config: RocketConfig):
    """``bytes_fn(d_in, d_out, rank, keep)`` of the configured storage (fp16 when not quantized)."""
    return bytes_fn(config.quantize, config.quant_group_size, config.quant_v_bits)


def quant_fractions(config: RocketConfig, d_in: int, d_out: int) -> tuple[float, ...]:
    """The profiled byte fractions, relative to the layer's dense weight *quantized the same way* (so a grid of
    0.2..0.9 spans ranks up to ~0.9 of the quantized dense bytes), expressed as fractions of the fp16 dense bytes
    that :func:`compress.candidates.candidate_grid` multiplies."""
    if not config.quantize:
        return tuple(config.byte_fractions)
    rel = quant_dense_bytes(d_in, d_out, config.quantize, config.quant_group_size) / dense_weight_bytes(d_in, d_out)
    return tuple(f * rel for f in config.byte_fractions)


_HINV_CACHE: list = []      # [(s, factor)]: the candidates of one layer share its Gram (one Cholesky per layer)


def _hinv_factor(s: torch.Tensor, act_order: bool):
    """:func:`compress.gptq.inverse_hessian_factor` of ``S^T S``, cached for the last ``s`` seen (natural order)."""
    if act_order:
        return None
    if _HINV_CACHE and _HINV_CACHE[0][0] is s:
        return _HINV_CACHE[0][1]
    from .gptq import inverse_hessian_factor
    fac = inverse_hessian_factor(s.t() @ s)
    _HINV_CACHE[:] = [(s, fac)]
    return fac


def quantize_factorization(eb: Eigenbasis, f: Factorization, config: RocketConfig, factor_aware: bool = True):
    """Quantized factors of ``f``. ``factor_aware`` False (profiling): U round-to-nearest, V as factorized -- the
    knapsack ranks candidates by these errors; True (materialising): ``config.quant_u_method`` /
    ``quant_v_refit`` (GPTQ on U with the layer's input Gram, V refit to U_q), which only lower the chosen
    layer's error (docs/quantization.md, "GPTQ")."""
    gptq = factor_aware and config.quant_u_method == "gptq"
    return quantize_factors(f.u, f.v, f.keep_mask, eb.s, config.quantize, config.quant_group_size,
                            u_metric=U_METRIC, v_metric=V_METRIC, u_method="gptq" if gptq else "rtn",
                            act_order=config.quant_act_order, v_refit=factor_aware and config.quant_v_refit,
                            z=eb.z, hinv_factor=_hinv_factor(eb.s, config.quant_act_order) if gptq else None,
                            v_bits=config.quant_v_bits)


def quantize_dense_weight(w: torch.Tensor, s: torch.Tensor, config: RocketConfig):
    """The dense weight quantized with ``config.quant_method`` (rtn: whitened clip search; gptq: error feedback
    with the layer's input Gram ``S^T S``)."""
    if config.quant_method == "rtn":
        return quantize_dense(w, s, config.quantize, config.quant_group_size, metric=DENSE_METRIC)
    from .gptq import gptq_quantize
    s = s.to(w.dtype)
    return gptq_quantize(w, s.t() @ s, u_format(config.quantize), config.quant_group_size, config.quant_act_order)


def quantized_option(eb: Eigenbasis, f: Factorization, config: RocketConfig, sensitivity=None):
    """The :class:`LayerOption` of a candidate with its factors quantized: quantized bytes (scales included) and
    the exact whitened / original / fisher errors of ``U_q V_q``."""
    from .profile import LayerOption
    d_in, d_out = eb.w.shape
    qf = quantize_factorization(eb, f, config, factor_aware=False)
    st = factor_error_stats(eb.w, qf, eb.s, eb.z, eb.z_norm)
    return LayerOption(f.rank, f.keep, qf.bytes(d_in, d_out), factor_params(d_in, d_out, f.rank, f.keep),
                       st.rel_original, st.rel_whitened, st.whitened_sq, fisher_error(st.col_sq, sensitivity))


def quant_dense_option(w: torch.Tensor, s: torch.Tensor, config: RocketConfig, sensitivity=None):
    """The dense option of a layer under ``--quantize``: its weight quantized per output channel (int8 / fp8) or
    group-wise (int4), with the measured error (not 0). ``rank == 0`` marks it dense."""
    from .profile import LayerOption
    w = w.to(torch.float32)
    s = s.to(torch.float32)
    qm = quantize_dense_weight(w, s, config)
    st = error_stats(w, qm.deq, s)
    return LayerOption(0, 0, qm.bytes, w.shape[0] * w.shape[1], st.rel_original, st.rel_whitened, st.whitened_sq,
                       fisher_error(st.col_sq, sensitivity))


def quant_record(config: RocketConfig, kind: str) -> dict:
    """The ``quant`` entry of a layer record in rocket.json."""
    group = config.quant_group_size if config.quantize == "int4" else None
    if kind == "dense":
        return {"scheme": config.quantize, "w": u_format(config.quantize), "group_size": group,
                "method": config.quant_method}
    return {"scheme": config.quantize, "u": u_format(config.quantize), "v": v_format(config.quantize, config.quant_v_bits),
            "group_size": group, "method": config.quant_u_method, "v_refit": config.quant_v_refit}


def materialize_quant_layer(model: nn.Module, name: str, lin: nn.Linear, eb: Eigenbasis, opt, config: RocketConfig,
                            sensitivity=None) -> dict:
    """Replace ``lin`` by its quantized form (``opt`` None: dense weight quantized; else quantized ROCKET factors
    at ``opt.rank, opt.keep``), computed in float64 exactly as deployed. Returns the layer record fields."""
    storage = getattr(torch, config.storage_dtype)
    bias = lin.bias.detach().to(storage).cpu() if lin.bias is not None else None
    w, s = eb.w, eb.s
    d_in, d_out = w.shape
    if opt is None:
        qm = quantize_dense_weight(w, s, config)
        st = error_stats(w, qm.deq.to(w.dtype), s, eb.z_norm)
        new = QuantDenseLinear.from_quantized(qm, bias)
        rec = dict(kind="dense", rank=None, keep=None, bytes=qm.bytes, params=d_in * d_out)
        if config.quant_method != "rtn":       # what round-to-nearest would have cost (error reduction per layer)
            rtn = quantize_dense(w, s, config.quantize, config.quant_group_size, metric=DENSE_METRIC)
            rec["rel_whitened_rtn"] = error_stats(w, rtn.deq.to(w.dtype), s, eb.z_norm).rel_whitened
    else:
        f = factorize(eb, opt.rank, opt.keep, config.importance_lambda, config.oversparsify, config.ridge_rel,
                      refit=config.method != "svd-llm")
        qf = quantize_factorization(eb, f, config)
        st = factor_error_stats(w, qf, s, eb.z, eb.z_norm)
        new = QuantRocketLinear.from_quantized(qf, d_in, d_out, bias)
        rec = dict(kind="rocket", rank=f.rank, keep=f.keep, bytes=qf.bytes(d_in, d_out),
                   params=factor_params(d_in, d_out, f.rank, f.keep))
        if config.quant_u_method != "rtn" or config.quant_v_refit:
            rtn = quantize_factorization(eb, f, config, factor_aware=False)
            rec["rel_whitened_rtn"] = factor_error_stats(w, rtn, s, eb.z, eb.z_norm).rel_whitened
    set_module(model, name, new.to(lin.weight.device))
    rec.update(rel_original=st.rel_original, rel_whitened=st.rel_whitened, whitened_sq=st.whitened_sq,
               quant=quant_record(config, rec["kind"]))
    return rec
