"""What an export may be asked for, checked before any tracing: target, dtype, plugin domain and the settings of
quantized layers. Every refusal is an :class:`ExportError` naming the fix."""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.onnx_contract import EXPORT_DTYPES, EXPORT_TARGETS, ONNX_DOMAIN, PLUGIN_DOMAINS

TARGETS = EXPORT_TARGETS
DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.float16)))
INT8_COMPUTE = ("weight-only", "dynamic")
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_INT4_ACCURACY_LEVEL = 4


class ExportError(RuntimeError):
    """The export or its validation failed; the message says why and what to change."""


def check_options(target: str, dtype: str, plugin_domain: str = ONNX_DOMAIN) -> None:
    """Refuse an unknown target / dtype / plugin domain, and a non-default plugin domain for the ort target (whose
    graph has no plugin node)."""
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if plugin_domain not in PLUGIN_DOMAINS:
        raise ExportError(f"plugin domain must be one of {PLUGIN_DOMAINS}, got {plugin_domain!r}")
    if target != "trt" and plugin_domain != ONNX_DOMAIN:
        raise ExportError(f"--plugin-domain {plugin_domain} applies to --target trt only (the ort graph has no "
                          f"plugin node); drop it or export with --target trt")


def is_quantized_model(model: nn.Module) -> bool:
    from rocket_deploy.quant_linear import QUANT_MODULES
    return any(isinstance(m, QUANT_MODULES) for m in model.modules())


def _formats(model: nn.Module) -> tuple[set, set, set]:
    """(every format, the U / dense-weight formats, the V formats) of the model's quantized layers."""
    from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
    weight_fmts, v_fmts = set(), set()
    for m in model.modules():
        if isinstance(m, QuantRocketLinear):
            weight_fmts.add(m.u_fmt)
            v_fmts.add(m.v_fmt)
        elif isinstance(m, QuantDenseLinear):
            weight_fmts.add(m.fmt)
    return weight_fmts | v_fmts, weight_fmts, v_fmts


def quant_export_settings(model: nn.Module, target: str, dtype: str, int8_compute: str = "weight-only",
                          int4_accuracy_level: int | None = None) -> dict:
    """Check the quantized-export options against the model / target / dtype; returns what the export records
    (empty for a model without quantized layers). Raises :class:`ExportError` naming the fix."""
    if int8_compute not in INT8_COMPUTE:
        raise ExportError(f"int8_compute must be one of {INT8_COMPUTE}, got {int8_compute!r}")
    if int4_accuracy_level is not None and int(int4_accuracy_level) not in INT4_ACCURACY_LEVELS:
        raise ExportError(f"int4_accuracy_level must be one of {INT4_ACCURACY_LEVELS}, got {int4_accuracy_level!r}")
    if not is_quantized_model(model):
        return {}
    fmts, weight_fmts, v_fmts = _formats(model)
    if target == "trt":
        if int8_compute != "weight-only" or int4_accuracy_level not in (None, 0):
            raise ExportError("--int8-compute / --int4-accuracy-level apply to --target ort only; the trt graph is "
                              "weight-only (TensorRT picks its kernels)")
        compute = [f"{f} DequantizeLinear -> MatMul" if f != "int4" else
                   "int4 INT4 blocked DequantizeLinear -> MatMul + zero-point correction" for f in sorted(weight_fmts)]
        if v_fmts:
            compute.append(f"V {'/'.join(sorted(v_fmts))} codes + scales -> RocketSparseVMatMul")
        return {"formats": sorted(fmts), "activations_quantized": False, "compute": "; ".join(compute)}
    level = DEFAULT_INT4_ACCURACY_LEVEL if int4_accuracy_level is None else int(int4_accuracy_level)
    if int8_compute == "dynamic" and dtype != "fp32":
        raise ExportError("--int8-compute dynamic needs --dtype fp32 (ONNX Runtime's dynamic int8 MatMul kernels "
                          "take float32 activations); use --int8-compute weight-only for fp16")
    dynamic = int8_compute == "dynamic" and "int8" in weight_fmts
    compute = []
    if "int4" in weight_fmts:
        compute.append(f"int4 MatMulNBits accuracy_level {level}")
    if "int8" in weight_fmts:
        compute.append("int8 DequantizeLinear -> MatMul (dynamic int8)" if dynamic else "int8 weight-only (folded)")
    if "fp8" in weight_fmts:
        compute.append("fp8 LUT weight-only (folded)")
    if fmts - weight_fmts:
        compute.append(f"V {'/'.join(sorted(fmts - weight_fmts))} folded")
    out = {"formats": sorted(fmts), "int8_compute": int8_compute,
           "activations_quantized": bool(("int4" in weight_fmts and level == 4) or dynamic),
           "compute": "; ".join(compute)}
    if "int4" in fmts:
        out["int4_accuracy_level"] = level
    return out
