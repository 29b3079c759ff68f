"""What an export may be asked for, checked before any tracing: target, dtype, opset, trace device, validation
tolerances, plugin domain and the settings of quantized layers (:class:`ExportOptions` holds them). Every refusal is
an :class:`ExportError` naming the fix."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from rocket_deploy.onnx_contract import EXPORT_DTYPES, EXPORT_TARGETS, ONNX_DOMAIN, OPSET, PLUGIN_DOMAINS

TARGETS = EXPORT_TARGETS
DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.float16, torch.bfloat16)))
DEVICES = ("cpu", "cuda")
MERGES = ("auto", "never", "always")
INT8_COMPUTE = ("weight-only", "dynamic")
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_INT4_ACCURACY_LEVEL = 4


class ExportError(RuntimeError):
    """The export or its validation failed; the message says why and what to change."""


def supported_opsets() -> range:
    """The default-domain opsets the exporter can write: from the one torchlib implements the aten ops in
    (:data:`OPSET`, 18; ``torch.onnx.export`` only *tries* to convert below it and silently keeps 18 when that fails)
    up to the highest the onnxscript version converter supports and the installed ``onnx`` knows."""
    import onnx
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET as conv_max
    except ImportError:                      # another onnxscript layout: the onnx package's own bound only
        conv_max = onnx.defs.onnx_opset_version()
    return range(OPSET, min(int(conv_max), int(onnx.defs.onnx_opset_version())) + 1)


def check_opset(opset: int | None) -> None:
    if opset is None:
        return
    ok = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise ExportError(f"--opset {opset} is not supported by this exporter: use {ok.start}..{ok.stop - 1} "
                          f"(torch.onnx.export writes opset {OPSET} and converts upward; default {OPSET})")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ExportError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch (CUDA {torch.version.cuda}) sees no GPU")
        raise ExportError(f"--device cuda needs a CUDA GPU, but {why}; export with --device cpu (the default) or "
                          f"see `rocket-deploy doctor`")


def check_tolerance(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ExportError(f"--{name} must be a finite number >= 0, got {value!r}")


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
    if target == "ort-packed" and dtype != "fp32":
        raise ExportError(f"--target ort-packed computes in fp32 with fp16 weights (the CPU custom-op library takes "
                          f"float32 activations); drop --dtype {dtype} or export with --target ort / trt")


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Every knob of :func:`rocket_deploy.export.export_model`, checked on construction (:class:`ExportError`).

    * ``target`` / ``dtype`` / ``plugin_domain``: see :func:`check_options`; ``dtype`` "bf16" carries the float
      weights and activations in bfloat16 (see docs/export.md for how such graphs are validated);
    * ``opset``: default-domain opset of the graph (None: :data:`OPSET`), one of :func:`supported_opsets`;
    * ``device``: where the model is traced ("cpu", or "cuda" when torch sees a GPU); the file is the same;
    * ``atol`` / ``rtol``: validation bounds replacing the dtype's defaults
      (:data:`rocket_deploy.export.validate.TOLERANCES`); None keeps the default;
    * ``merge`` / ``weights_fp16`` (ort target), ``int8_compute`` / ``int4_accuracy_level`` (quantized artifacts),
      ``debug_metadata``: as documented on ``export_model``.
    """
    target: str = "ort"
    dtype: str = "fp32"
    opset: int | None = None
    device: str = "cpu"
    atol: float | None = None
    rtol: float | None = None
    plugin_domain: str = ONNX_DOMAIN
    merge: str = "auto"
    weights_fp16: bool = True
    int8_compute: str = "weight-only"
    int4_accuracy_level: int | None = None
    debug_metadata: bool = False

    def __post_init__(self):
        check_options(self.target, self.dtype, self.plugin_domain)
        check_opset(self.opset)
        check_device(self.device)
        check_tolerance("atol", self.atol)
        check_tolerance("rtol", self.rtol)
        if self.merge not in MERGES:
            raise ExportError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if self.int8_compute not in INT8_COMPUTE:
            raise ExportError(f"int8_compute must be one of {INT8_COMPUTE}, got {self.int8_compute!r}")
        if self.int4_accuracy_level is not None and self.int4_accuracy_level not in INT4_ACCURACY_LEVELS:
            raise ExportError(f"int4_accuracy_level must be one of {INT4_ACCURACY_LEVELS}, "
                              f"got {self.int4_accuracy_level!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def graph_opset(self) -> int:
        return OPSET if self.opset is None else int(self.opset)


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
    if dtype == "bf16":
        raise ExportError("--dtype bf16 is not supported for quantized artifacts (their int8 / fp8 / int4 export "
                          "paths compute in fp32 or fp16); export them with --dtype fp16 or fp32")
    if target == "ort-packed":
        raise ExportError("--target ort-packed runs unquantized ROCKET artifacts (fp16 weights kept fp16); export "
                          "a quantized artifact with --target ort or --target trt")
    fmts, weight_fmts, v_fmts = _formats(model)
    if target == "trt":
        if int8_compute != "weight-only" or int4_accuracy_level not in (None, 0):
            raise ExportError("--int8-compute / --int4-accuracy-level apply to --target ort only; the trt graph is "
                              "weight-only (TensorRT picks its kernels)")
        compute = [f"{f} DequantizeLinear -> MatMul" if f != "int4" else
                   "int4 INT4 blocked DequantizeLinear -> MatMul + zero-point correction" for f in sorted(weight_fmts)]
        if v_fmts:
            names = [f if f != "int4s" else "int4s (widened to int8 codes)" for f in sorted(v_fmts)]
            compute.append(f"V {'/'.join(names)} codes + scales -> RocketSparseVMatMul")
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
