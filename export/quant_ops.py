"""The ``rocket_quant`` torch custom ops of quantized layers and their ONNX (onnxscript) translations.

Export stand-ins (:mod:`.quant_ort`, :mod:`.quant_trt`) call these ops in their forward; :func:`custom_translation_table`
maps them to ONNX for ``torch.onnx.export(dynamo=True)``:

* ``rocket_quant::matmul_nbits(x, packed, scales, zeros, K, N, block_size)`` -> one ``com.microsoft.MatMulNBits``
  node (int4 U or int4 dense weight; ORT contrib op, CPU and CUDA EPs; bits=4, asymmetric, zero points packed
  two per byte, scales in the activation dtype);
* ``rocket_quant::dequant_cols(q, scales, axis)`` -> ``Mul(Cast(q int8), scales)``: constant-folded by ORT into
  an fp32 weight at session start (exact weight-only int8; ORT never folds DequantizeLinear, which would then
  run on every call);
* ``rocket_quant::dequant_linear(q, scales, axis)`` -> ``DequantizeLinear`` (only with ``int8_fused=True``:
  DQ(axis 1) -> MatMul, which ORT fuses into a dynamic-quantization int8 kernel -- about 2-2.5x faster at 1 token
  on CPU, but the activations get quantized too);
* ``rocket_quant::dequant_fp8(bits, scales, axis)`` -> ``Mul(Gather(LUT[256], Cast(bits)), scales)``: the fp8
  e4m3fn codes travel as their uint8 bit patterns and are decoded by a 256-entry table, which works at opset 18
  (``DequantizeLinear`` / ``Cast`` from float8 need opset 19 and a float8-enabled build);
* ``rocket_quant::dequantize_linear(q, scales, axis)`` -> ``DequantizeLinear`` (opset-19 form, trt target: int8 /
  float8 codes, output dtype = the scales' dtype).

Every dequantization depends on initializers only, so ORT's constant folding turns it into a plain float weight
once at session start (the file keeps the 1-byte / 4-bit form: the exporter's own optimizer is told not to fold
them, see :mod:`.driver`); ``MatMulNBits`` stays 4-bit at run time.
"""
from __future__ import annotations

import numpy as np
import torch

from rocket_deploy.onnx_contract import MS_DOMAIN
from rocket_deploy.quant_format import dequant_int4


def fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (NaN codes 0x7F / 0xFF -> NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


def _scaled(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """float32 ``q * scales`` with the 1-D ``scales`` broadcast along ``axis`` of the 2-D ``q``."""
    s = scales.to(torch.float32)
    return q.to(torch.float32) * (s[None, :] if axis == 1 else s[:, None])


# ----------------------------------------------------------------------------------------------- torch custom ops
@torch.library.custom_op("rocket_quant::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 K: int, N: int, block_size: int, accuracy_level: int = 0) -> torch.Tensor:
    """``x @ W`` with ``W [K, N]`` in MatMulNBits layout (reference: dequantize and multiply, i.e. the
    weight-only result; ``accuracy_level`` only goes into the ONNX node)."""
    w = dequant_int4(packed.cpu(), scales.cpu(), zeros.cpu(), K, x.dtype).to(x.device)
    return torch.matmul(x, w)


@matmul_nbits.register_fake
def _(x, packed, scales, zeros, K, N, block_size, accuracy_level=0):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("rocket_quant::dequant_cols", mutates_args=())
def dequant_cols(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """float32 ``q * scales`` with ``scales`` broadcast along ``axis`` of the 2-D int8 ``q``."""
    return _scaled(q, scales, axis)


@dequant_cols.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("rocket_quant::dequant_linear", mutates_args=())
def dequant_linear(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """As ``dequant_cols`` but exported as ``DequantizeLinear`` (lets ORT fuse DQ -> MatMul into int8 kernels)."""
    return _scaled(q, scales, axis)


@dequant_linear.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("rocket_quant::dequantize_linear", mutates_args=())
def dequantize_linear(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` semantics for the trt target: ``q`` int8 or float8_e4m3fn (2-D), ``scales`` 1-D
    along ``axis``; the result has ``scales``' dtype (float32 or float16, as the graph computes)."""
    return _scaled(q, scales, axis).to(scales.dtype)


@dequantize_linear.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=scales.dtype)


@torch.library.custom_op("rocket_quant::dequant_fp8", mutates_args=())
def dequant_fp8(bits: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """float32 value of fp8 e4m3fn codes given as uint8 bit patterns, times ``scales`` along ``axis``."""
    return _scaled(bits.view(torch.float8_e4m3fn), scales, axis)


@dequant_fp8.register_fake
def _(bits, scales, axis):
    return bits.new_empty(bits.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- MatMulNBits schema
_SCHEMA_DONE = False


def _matmul_nbits_inference(ctx) -> None:
    """Shape inference of ``MatMulNBits``: ``Y`` = ``A``'s type and shape with the last dim replaced by ``N``."""
    import onnx
    a = ctx.get_input_type(0)
    if a is None or not a.HasField("tensor_type"):
        return
    out = onnx.TypeProto()
    out.CopyFrom(a)
    shape = out.tensor_type.shape
    if a.tensor_type.HasField("shape") and len(shape.dim):
        last = shape.dim[len(shape.dim) - 1]
        last.Clear()
        last.dim_value = int(ctx.get_attribute("N").i)
    ctx.set_output_type(0, out)


def register_matmul_nbits_schema() -> None:
    """Make ``com.microsoft.MatMulNBits`` known to ``onnx`` (onnxscript needs a schema to build the node, the checker
    and shape inference to check it; ONNX Runtime has its own). Inputs A, B (uint8 [N, nb, block/2]), scales
    ([N, nb] or [N*nb]), zero_points (uint8 [N, ceil(nb/2)] packed, optional), g_idx, bias (optional); attributes
    K, N, bits, block_size, accuracy_level."""
    global _SCHEMA_DONE
    if _SCHEMA_DONE:
        return
    from onnx import defs
    try:
        defs.get_schema("MatMulNBits", 1, MS_DOMAIN)
    except defs.SchemaError:
        P, A, AT = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
        opt = defs.OpSchema.FormalParameterOption.Optional
        schema = defs.OpSchema(
            "MatMulNBits", MS_DOMAIN, 1, doc="ONNX Runtime contrib op: Y = A @ dequant(B)^T, B block-quantized along K",
            inputs=[P("A", "T1", "activations [..., K]"), P("B", "T2", "packed weights [N, n_blocks, blob]"),
                    P("scales", "T1", "scales"), P("zero_points", "T3", "zero points", param_option=opt),
                    P("g_idx", "T4", "group index", param_option=opt), P("bias", "T1", "bias [N]", param_option=opt)],
            outputs=[P("Y", "T1", "[..., N]")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "float"),
                              ("T2", ["tensor(uint8)", "tensor(int32)"], "packed"),
                              ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"], "zp"),
                              ("T4", ["tensor(int32)"], "g_idx")],
            attributes=[A("K", AT.INT, "input features"), A("N", AT.INT, "output features"),
                        A("bits", AT.INT, "bits per weight"), A("block_size", AT.INT, "group size along K"),
                        A("accuracy_level", AT.INT, "minimum compute accuracy (0-4)", required=False)])
        schema.set_type_and_shape_inference_function(_matmul_nbits_inference)
        defs.register_schema(schema)
    _SCHEMA_DONE = True


# -------------------------------------------------------------------------------------------- onnxscript translations
def _onnx_matmul_nbits(x, packed, scales, zeros, K: int, N: int, block_size: int, accuracy_level: int = 0):
    """``scales`` must already be in the activation dtype (the stand-ins store them so): an initializer straight
    into the node lets ORT prepack the weight at session start."""
    register_matmul_nbits_schema()
    import onnxscript
    ms = onnxscript.values.Opset(MS_DOMAIN, 1)
    return ms.MatMulNBits(x, packed, scales, zeros, K=K, N=N, bits=4, block_size=block_size,
                          accuracy_level=accuracy_level)


def _onnx_dequant_cols(q, scales, axis: int):
    from onnxscript import opset18 as op
    s = op.Unsqueeze(scales, op.Constant(value_ints=[0 if axis == 1 else 1]))
    return op.Mul(op.Cast(q, to=1), s)                        # 1 = FLOAT; constant-folded by ORT


def _onnx_dequant_linear(q, scales, axis: int):
    from onnxscript import opset18 as op
    return op.DequantizeLinear(q, scales, axis=axis)


def _onnx_dequantize_linear(q, scales, axis: int):
    # float8 inputs / float16 scales need DequantizeLinear-19: the trt pass (trt_graph.prepare_trt_graph) sets the opset
    from onnxscript import opset19 as op
    return op.DequantizeLinear(q, scales, axis=axis)


def _onnx_dequant_fp8(bits, scales, axis: int):
    from onnx import numpy_helper
    from onnxscript import opset18 as op
    lut = op.Constant(value=numpy_helper.from_array(fp8_e4m3fn_table(), "rocket_quant.fp8_lut"))
    vals = op.Gather(lut, op.Cast(bits, to=6), axis=0)           # 6 = INT32
    s = op.Unsqueeze(scales, op.Constant(value_ints=[0 if axis == 1 else 1]))
    return op.Mul(vals, s)


def custom_translation_table() -> dict:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {torch.ops.rocket_quant.matmul_nbits.default: _onnx_matmul_nbits,
            torch.ops.rocket_quant.dequant_cols.default: _onnx_dequant_cols,
            torch.ops.rocket_quant.dequant_linear.default: _onnx_dequant_linear,
            torch.ops.rocket_quant.dequant_fp8.default: _onnx_dequant_fp8,
            torch.ops.rocket_quant.dequantize_linear.default: _onnx_dequantize_linear}
