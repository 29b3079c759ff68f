"""ONNX building blocks for quantized ROCKET layers (``--quantize`` artifacts, format version 2).

Owned by the compression engine; the exporter calls these (see docs/quantization.md, "Export"). Two levels:

1. **torch side** (for ``torch.onnx.export(dynamo=True)``): :func:`export_module_for` returns an export stand-in for
   a :class:`~rocket_deploy.quant_linear.QuantRocketLinear` / :class:`~rocket_deploy.quant_linear.QuantDenseLinear`
   whose forward calls the custom ops below; :func:`custom_translation_table` maps them to ONNX
   (merge it into the exporter's table):

   * ``rocket_quant::matmul_nbits(x, packed, scales, zeros, K, N, block_size)`` -> one ``com.microsoft.MatMulNBits``
     node (int4 U or int4 dense weight; ORT contrib op, CPU and CUDA EPs; bits=4, asymmetric, zero points packed
     two per byte, scales float32 in the graph);
   * ``rocket_quant::dequant_cols(q, scales, axis)`` -> ``Mul(Cast(q int8), scales)``: constant-folded by ORT into
     an fp32 weight at session start (exact weight-only int8; ORT never folds DequantizeLinear, which would then
     run on every call);
   * ``rocket_quant::dequant_linear(q, scales, axis)`` -> ``DequantizeLinear`` (only with ``int8_fused=True``:
     DQ(axis 1) -> MatMul, which ORT fuses into a dynamic-quantization int8 kernel -- about 2-2.5x faster at 1 token
     on CPU, but the activations get quantized too);
   * ``rocket_quant::dequant_fp8(bits, scales, axis)`` -> ``Mul(Gather(LUT[256], Cast(bits)), scales)``: the fp8
     e4m3fn codes travel as their uint8 bit patterns and are decoded by a 256-entry table, which works at opset 18
     (``DequantizeLinear`` / ``Cast`` from float8 need opset 19 and a float8-enabled build).

   Every dequantization depends on initializers only, so ORT's constant folding turns it into a plain float weight
   once at session start (the file keeps the 1-byte / 4-bit form: the exporter's own optimizer is told not to fold
   them, ``onnx_export._keep_quantized_codes``); ``MatMulNBits`` stays 4-bit at run time.
   V's values are dequantized in-graph to float and then fed to ``rocket::sparse_v_matmul`` with ``value_type=0``,
   so the existing lowering (:func:`rocket_deploy.export.lowering.lower_rocket_nodes`) applies unchanged.

   ``target="trt"`` (:class:`TrtQuantRocketLinear`, :class:`TrtQuantDenseLinear`): weight-only
   ``rocket_quant::dequantize_linear`` -> ``DequantizeLinear`` (int8 / float8 codes, per-column scales in the
   compute dtype) for U and dense weights, int4 through ``matmul_nbits`` rewritten by :func:`prepare_trt_graph`
   into a symmetric INT4 blocked ``DequantizeLinear`` + zero-point correction, and V handed to the plugin node
   with its codes and float32 scales (``value_type`` 1 / 2).

2. **graph side**: :func:`prepare_trt_graph` (``onnx_ir`` pass of the trt export) and, with ``onnx.helper``,
   :func:`matmul_nbits_node`, :func:`dequant_int8_nodes`,
   :func:`cast_dequant_nodes`, :func:`dequant_fp8_nodes`, :func:`dynamic_int8_matmul_nodes` build the same ops as NodeProtos + initializers;
   :func:`quant_linear_model` assembles a one-layer model (used by bench/bench_quant_ops.py and the tests).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rocket_deploy.onnx_contract import MS_DOMAIN
from rocket_deploy.quant_format import dequant_int4
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear



def fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (NaN codes 0x7F / 0xFF -> NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


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
    s = scales.to(torch.float32)
    return q.to(torch.float32) * (s[None, :] if axis == 1 else s[:, None])


@dequant_cols.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("rocket_quant::dequant_linear", mutates_args=())
def dequant_linear(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """As ``dequant_cols`` but exported as ``DequantizeLinear`` (lets ORT fuse DQ -> MatMul into int8 kernels)."""
    s = scales.to(torch.float32)
    return q.to(torch.float32) * (s[None, :] if axis == 1 else s[:, None])


@dequant_linear.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("rocket_quant::dequantize_linear", mutates_args=())
def dequantize_linear(q: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` semantics for the trt target: ``q`` int8 or float8_e4m3fn (2-D), ``scales`` 1-D
    along ``axis``; the result has ``scales``' dtype (float32 or float16, as the graph computes)."""
    s = scales.to(torch.float32)
    w = q.to(torch.float32) * (s[None, :] if axis == 1 else s[:, None])
    return w.to(scales.dtype)


@dequantize_linear.register_fake
def _(q, scales, axis):
    return q.new_empty(q.shape, dtype=scales.dtype)


@torch.library.custom_op("rocket_quant::dequant_fp8", mutates_args=())
def dequant_fp8(bits: torch.Tensor, scales: torch.Tensor, axis: int) -> torch.Tensor:
    """float32 value of fp8 e4m3fn codes given as uint8 bit patterns, times ``scales`` along ``axis``."""
    s = scales.to(torch.float32)
    v = bits.view(torch.float8_e4m3fn).to(torch.float32)
    return v * (s[None, :] if axis == 1 else s[:, None])


@dequant_fp8.register_fake
def _(bits, scales, axis):
    return bits.new_empty(bits.shape, dtype=torch.float32)


_SCHEMA_DONE = False


def register_matmul_nbits_schema() -> None:
    """Make ``com.microsoft.MatMulNBits`` known to ``onnx`` (onnxscript needs a schema to build the node; ONNX
    Runtime has its own). Inputs A, B (uint8 [N, nb, block/2]), scales ([N, nb] or [N*nb]), zero_points (uint8
    [N, ceil(nb/2)] packed, optional), g_idx, bias (optional); attributes K, N, bits, block_size, accuracy_level."""
    global _SCHEMA_DONE
    if _SCHEMA_DONE:
        return
    from onnx import defs
    try:
        defs.get_schema("MatMulNBits", 1, MS_DOMAIN)
    except defs.SchemaError:
        P, A, AT = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType
        opt = defs.OpSchema.FormalParameterOption.Optional
        defs.register_schema(defs.OpSchema(
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
                        A("accuracy_level", AT.INT, "minimum compute accuracy (0-4)", required=False)]))
    _SCHEMA_DONE = True


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
    # float8 inputs / float16 scales need DequantizeLinear-19: the trt pass (prepare_trt_graph) sets the opset
    from onnxscript import opset19 as op
    return op.DequantizeLinear(q, scales, axis=axis)


def _onnx_dequant_fp8(bits, scales, axis: int):
    from onnxscript import opset18 as op
    lut = op.Constant(value=_np_tensor(fp8_e4m3fn_table(), "rocket_quant.fp8_lut"))
    vals = op.Gather(lut, op.Cast(bits, to=6), axis=0)           # 6 = INT32
    s = op.Unsqueeze(scales, op.Constant(value_ints=[0 if axis == 1 else 1]))
    return op.Mul(vals, s)


def _np_tensor(arr: np.ndarray, name: str):
    from onnx import numpy_helper
    return numpy_helper.from_array(arr, name)


def custom_translation_table() -> dict:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {torch.ops.rocket_quant.matmul_nbits.default: _onnx_matmul_nbits,
            torch.ops.rocket_quant.dequant_cols.default: _onnx_dequant_cols,
            torch.ops.rocket_quant.dequant_linear.default: _onnx_dequant_linear,
            torch.ops.rocket_quant.dequant_fp8.default: _onnx_dequant_fp8,
            torch.ops.rocket_quant.dequantize_linear.default: _onnx_dequantize_linear}


# ---------------------------------------------------------------------------------------- export stand-in modules
def _register_matrix(mod: nn.Module, prefix: str, fmt: str, q, scales, zeros, dtype: torch.dtype) -> None:
    if fmt == "fp8":
        q = q.view(torch.uint8)              # bit patterns: decoded by the LUT in-graph
    mod.register_buffer(f"{prefix}_q", q)
    # int8 / fp8: float32 (the Cast -> Mul / LUT product is float32); int4: the activation dtype, as MatMulNBits
    # wants its scales (stored fp16: exact in either dtype)
    mod.register_buffer(f"{prefix}_scales", scales.to(torch.float32) if fmt != "int4" else scales.to(dtype))
    mod.register_buffer(f"{prefix}_zeros", zeros)


def _dequant(fmt: str, q, scales, axis: int):
    if fmt == "fp8":
        return torch.ops.rocket_quant.dequant_fp8(q, scales, axis)
    return torch.ops.rocket_quant.dequant_cols(q, scales, axis)


def _weight(fmt: str, q, scales, fused: bool, axis: int):
    """float weight from its codes. ``fused=False``: Cast -> Mul (ORT folds it into an fp32 constant at session
    start: exact weight-only semantics, fp32 MatMul speed). ``fused=True`` (int8, codes ``[K, N]``):
    DequantizeLinear(axis=1) -> MatMul, which ORT (ORT_ENABLE_EXTENDED+) fuses into an int8 kernel that also
    quantizes the activations dynamically: faster, not weight-only. Result ``[K, N]`` for ``axis=1`` codes
    ``[K, N]``, ``[N, K]`` for ``axis=0`` codes ``[N, K]``."""
    if fused:
        return torch.ops.rocket_quant.dequant_linear(q, scales, 1)
    return _dequant(fmt, q, scales, axis)


def _bias(src, dtype):
    return src.bias.to(dtype) if src.bias is not None else None


class ExportQuantRocketLinear(nn.Module):
    """Export-time stand-in for :class:`QuantRocketLinear` (shares its tensors), ``ort`` target. ``x @ U`` is
    MatMulNBits (int4, ``accuracy_level`` as given) or MatMul with a Cast/Mul- or LUT-dequantized U (folded at
    session start) -- or, ``int8_fused``, ``DequantizeLinear -> MatMul`` (see :func:`_weight`); V's values are
    dequantized to float32 and the sparse product is ``rocket::sparse_v_matmul(..., value_type=0)`` as for
    unquantized layers. ``dtype``: the compute dtype of the exported graph."""

    def __init__(self, src: QuantRocketLinear, int8_fused: bool = False, dtype: torch.dtype = torch.float32,
                 accuracy_level: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.keep = src.in_features, src.out_features, src.rank, src.keep
        self.u_fmt, self.v_fmt, self.group = src.u_fmt, src.v_fmt, src.group
        self.fused = int8_fused and self.u_fmt == "int8"
        self.accuracy_level = int(accuracy_level)
        _register_matrix(self, "u", self.u_fmt, src.u_q, src.u_scales, src.u_zeros, dtype)
        vals = src.v_values.view(torch.uint8) if self.v_fmt == "fp8" else src.v_values
        self.register_buffer("v_values_q", vals)
        self.register_buffer("v_scales", src.v_scales)
        self.register_buffer("v_mask", src.v_mask.to(torch.uint8))
        self.register_buffer("bias", _bias(src, dtype))

    def forward(self, x):
        if self.u_fmt == "int4":
            t = torch.ops.rocket_quant.matmul_nbits(x, self.u_q, self.u_scales, self.u_zeros, self.in_features,
                                                    self.rank, self.group, self.accuracy_level)
        else:
            t = torch.matmul(x, _weight(self.u_fmt, self.u_q, self.u_scales, self.fused, 1).to(x.dtype))
        v_vals = _dequant(self.v_fmt, self.v_values_q, self.v_scales, 0).to(x.dtype)     # [d_out, keep]
        import rocket_deploy.export.rocket_op  # noqa: F401  (registers rocket::sparse_v_matmul)
        y = torch.ops.rocket.sparse_v_matmul(t, v_vals, self.v_mask, self.rank, self.keep, self.out_features, 0)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class ExportQuantDenseLinear(nn.Module):
    """Export-time stand-in for :class:`QuantDenseLinear`, ``ort`` target: MatMulNBits (int4), or MatMul with the
    weight dequantized in-graph (``w_q [d_out, d_in]`` per-row scales, transposed; folded at session start)."""

    def __init__(self, src: QuantDenseLinear, int8_fused: bool = False, dtype: torch.dtype = torch.float32,
                 accuracy_level: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.group = src.in_features, src.out_features, src.fmt, src.group
        self.fused = int8_fused and self.fmt == "int8"
        self.accuracy_level = int(accuracy_level)
        wq = src.w_q.t().contiguous() if self.fused else src.w_q       # stored [d_out, d_in]
        _register_matrix(self, "w", self.fmt, wq, src.w_scales, src.w_zeros, dtype)
        self.register_buffer("bias", _bias(src, dtype))

    def forward(self, x):
        if self.fmt == "int4":
            y = torch.ops.rocket_quant.matmul_nbits(x, self.w_q, self.w_scales, self.w_zeros, self.in_features,
                                                    self.out_features, self.group, self.accuracy_level)
        else:
            w = _weight(self.fmt, self.w_q, self.w_scales, self.fused, 0)
            y = torch.matmul(x, (w if self.fused else w.t()).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class TrtQuantRocketLinear(nn.Module):
    """Export-time stand-in for :class:`QuantRocketLinear`, ``trt`` target (weight-only Q/DQ + the plugin):

    * U int8 / fp8: ``MatMul(x, DequantizeLinear(u_q [d_in, r], u_scales [r] in the compute dtype, axis=1))``;
    * U int4: ``MatMulNBits`` here, rewritten after the export by :func:`prepare_trt_graph` into a symmetric INT4
      blocked ``DequantizeLinear`` plus a zero-point correction (TensorRT only takes zero points of 0);
    * V: ``rocket.RocketSparseVMatMul`` with the stored int8 / float8e4m3fn codes, the bitmask and the float32
      per-column scales as 4th input, ``value_type`` 1 (int8) / 2 (fp8) -- the plugin's contract."""

    def __init__(self, src: QuantRocketLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.keep = src.in_features, src.out_features, src.rank, src.keep
        self.u_fmt, self.v_fmt, self.group = src.u_fmt, src.v_fmt, src.group
        self.value_type = {"int8": 1, "fp8": 2}[self.v_fmt]
        self.register_buffer("u_q", src.u_q)
        self.register_buffer("u_scales", src.u_scales.to(dtype))
        self.register_buffer("u_zeros", src.u_zeros)
        self.register_buffer("v_values", src.v_values)                  # int8 / float8_e4m3fn, as stored
        self.register_buffer("v_scales", src.v_scales.to(torch.float32))
        self.register_buffer("v_mask", src.v_mask.to(torch.uint8))
        self.register_buffer("bias", _bias(src, dtype))

    def forward(self, x):
        if self.u_fmt == "int4":
            t = torch.ops.rocket_quant.matmul_nbits(x, self.u_q, self.u_scales, self.u_zeros, self.in_features,
                                                    self.rank, self.group, 0)
        else:
            t = torch.matmul(x, torch.ops.rocket_quant.dequantize_linear(self.u_q, self.u_scales, 1))
        import rocket_deploy.export.rocket_op  # noqa: F401  (registers rocket::sparse_v_matmul)
        y = torch.ops.rocket.sparse_v_matmul(t, self.v_values, self.v_mask, self.rank, self.keep, self.out_features,
                                             self.value_type, self.v_scales)
        if self.bias is not None:
            y = y + self.bias
        return y


class TrtQuantDenseLinear(nn.Module):
    """Export-time stand-in for :class:`QuantDenseLinear`, ``trt`` target: ``MatMul(x, DequantizeLinear(w_q^T
    [d_in, d_out], w_scales, axis=1))`` (int8 / fp8), or int4 as for U in :class:`TrtQuantRocketLinear`."""

    def __init__(self, src: QuantDenseLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.group = src.in_features, src.out_features, src.fmt, src.group
        self.register_buffer("w_q", src.w_q if self.fmt == "int4" else src.w_q.t().contiguous())
        self.register_buffer("w_scales", src.w_scales.to(dtype))
        self.register_buffer("w_zeros", src.w_zeros)
        self.register_buffer("bias", _bias(src, dtype))

    def forward(self, x):
        if self.fmt == "int4":
            y = torch.ops.rocket_quant.matmul_nbits(x, self.w_q, self.w_scales, self.w_zeros, self.in_features,
                                                    self.out_features, self.group, 0)
        else:
            y = torch.matmul(x, torch.ops.rocket_quant.dequantize_linear(self.w_q, self.w_scales, 1))
        if self.bias is not None:
            y = y + self.bias
        return y


def export_module_for(mod: nn.Module, int8_fused: bool = False, *, target: str = "ort",
                      dtype: torch.dtype = torch.float32, accuracy_level: int = 0) -> nn.Module | None:
    """The export stand-in of a quantized module, or None when ``mod`` is not quantized.

    ``target`` "ort" (standard ops + ``com.microsoft.MatMulNBits``; ``int8_fused`` and the int4 ``accuracy_level``
    apply) or "trt" (weight-only DequantizeLinear + the plugin node with quantized V); ``dtype``: the compute dtype
    of the graph."""
    if target == "trt":
        if isinstance(mod, QuantRocketLinear):
            return TrtQuantRocketLinear(mod, dtype)
        if isinstance(mod, QuantDenseLinear):
            return TrtQuantDenseLinear(mod, dtype)
        return None
    if target != "ort":
        raise ValueError(f"target must be 'ort' or 'trt', got {target!r}")
    if isinstance(mod, QuantRocketLinear):
        return ExportQuantRocketLinear(mod, int8_fused, dtype, accuracy_level)
    if isinstance(mod, QuantDenseLinear):
        return ExportQuantDenseLinear(mod, int8_fused, dtype, accuracy_level)
    return None


# ------------------------------------------------------------------------------------- trt graph pass (onnx_ir)
TRT_INT4_OPSET = 21        # DequantizeLinear with INT4 input and block_size
TRT_FP8_OPSET = 19         # DequantizeLinear / Cast with float8, float16 scales


def _unpack_nibbles_np(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., n]`` -> ``[..., 2n]`` codes, low nibble first (as :func:`compress.quantize.pack_nibbles`)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def int4_trt_tensors(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, block_size: int):
    """MatMulNBits storage -> the TensorRT form ``W = DQ(W4, S) + G @ ZS`` (exact: ``(c - z) s = (c - 8) s +
    (8 - z) s``), with ``W4 = c - 8`` signed int4 ``[K, N]`` (zero point 0, as TensorRT requires), ``S [nb, N]``
    the block scales along K, ``ZS = (8 - z) s [nb, N]`` (float32; all zero when every zero point is 8) and
    ``G [K, nb]`` the 0/1 block indicator (``x @ G`` = the per-block sums of x). Returns
    ``(w4 int8 [K, N], S float32, ZS float32 or None, G float32)``."""
    n, nb, half = packed.shape
    codes = _unpack_nibbles_np(packed).reshape(n, nb * half * 2)[:, :k]             # [N, K] in 0..15
    w4 = (codes.astype(np.int16) - 8).astype(np.int8).T.copy()                   # [K, N] in -8..7
    sc = scales.astype(np.float32).reshape(n, nb)
    z = _unpack_nibbles_np(zeros)[:, :nb].astype(np.float32)                      # [N, nb]
    zs = ((8.0 - z) * sc).T.copy()                                               # [nb, N]
    g = (np.arange(k)[:, None] // block_size == np.arange(nb)[None, :]).astype(np.float32)
    return w4, sc.T.copy(), (zs if np.any(z != 8) else None), g


def prepare_trt_graph(model) -> dict:
    """The trt target's pass over the exported ``onnx_ir`` model (a no-op for graphs without quantized layers):

    * every ``com.microsoft.MatMulNBits`` (int4 weight; not a TensorRT op) becomes
      ``MatMul(x, DequantizeLinear(W4 int4 [K, N], S [nb, N], axis=0, block_size))`` + ``MatMul(MatMul(x, G), ZS)``
      (see :func:`int4_trt_tensors`; the correction is left out when every zero point is 8), the file keeps the
      weight 4-bit (ONNX INT4 packs two per byte);
    * the default-domain opset is raised to what the graph needs -- 21 with INT4 blocked DequantizeLinear, 19
      with float8 tensors or float16 DequantizeLinear scales, else unchanged (18) -- by the onnxscript version
      converter. Returns counts."""
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape

    from .lowering import remove_unused_initializers, replace_node
    graph = model.graph
    stats = {"int4_dq": 0, "int4_zero_correction": 0, "opset": model.opset_imports.get("", 18)}
    shared: dict = {}
    for node in [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "MatMulNBits"]:
        a = {k: v.value for k, v in node.attributes.items()}
        k, n, bs = int(a["K"]), int(a["N"]), int(a["block_size"])
        x, packed, scales, zeros = node.inputs[:4]
        consts = [v.const_value if v is not None else None for v in (packed, scales, zeros)]
        if any(c is None for c in consts):
            raise ValueError(f"{node.name}: MatMulNBits weights must be initializers for the trt rewrite")
        w4, sc, zs, g = int4_trt_tensors(*(c.numpy() for c in consts), k, bs)
        act = scales.dtype                                    # the compute dtype (scales are stored in it)
        np_act = act.numpy()
        base = (packed.name or node.name).removesuffix(".u_q").removesuffix(".w_q").removesuffix("_q")
        tp = ir_tape.Tape()
        import ml_dtypes
        w_v = tp.initializer(ir.tensor(w4.astype(ml_dtypes.int4), name=f"{base}.q_int4"), name=f"{base}.q_int4")
        s_v = tp.initializer(ir.tensor(sc.astype(np_act), name=f"{base}.q_scales"), name=f"{base}.q_scales")
        wd = tp.op("DequantizeLinear", [w_v, s_v], {"axis": 0, "block_size": bs}, name=f"{base}.dq")
        wd.dtype, wd.shape = act, ir.Shape([k, n])
        y = tp.op("MatMul", [x, wd], name=f"{base}.matmul")
        if zs is not None:
            key = (k, bs, str(act))
            if key not in shared:
                name = f"rocket.int4_blocks_{k}_{bs}_{act.name.lower()}"
                shared[key] = tp.initializer(ir.tensor(g.astype(np_act), name=name), name=name)
            z_v = tp.initializer(ir.tensor(zs.astype(np_act), name=f"{base}.q_zero_corr"), name=f"{base}.q_zero_corr")
            sums = tp.op("MatMul", [x, shared[key]], name=f"{base}.block_sums")
            corr = tp.op("MatMul", [sums, z_v], name=f"{base}.zero_corr")
            y = tp.op("Add", [y, corr], name=f"{base}.int4_out")
            stats["int4_zero_correction"] += 1
        replace_node(graph, node, tp, y)
        stats["int4_dq"] += 1
    if stats["int4_dq"]:
        remove_unused_initializers(graph)
    if not any(nd.domain == MS_DOMAIN for nd in graph.all_nodes()):
        graph.opset_imports.pop(MS_DOMAIN, None)
        model.opset_imports.pop(MS_DOMAIN, None)
    need = stats["opset"]
    if stats["int4_dq"]:
        need = max(need, TRT_INT4_OPSET)
    f8 = {ir.DataType.FLOAT8E4M3FN}
    if any(v.dtype in f8 for v in graph.initializers.values()) or any(
            nd.op_type == "DequantizeLinear" and nd.domain == "" and nd.inputs[1].dtype == ir.DataType.FLOAT16
            for nd in graph.all_nodes()):
        need = max(need, TRT_FP8_OPSET)
    if need != stats["opset"]:
        from onnxscript import version_converter
        version_converter.convert_version(model, need)
        model.opset_imports[""] = need
        graph.opset_imports[""] = need
        stats["opset"] = need
    return stats


# ---------------------------------------------------------------------------------- onnx.helper graph building
def matmul_nbits_node(x: str, y: str, prefix: str, packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                      k: int, n: int, block_size: int, accuracy_level: int | None = None):
    """``y = x @ W`` with ``W [K, N]`` stored as ``packed uint8 [N, nb, block/2]``, ``scales [N, nb]``,
    ``zeros uint8 [N, ceil(nb/2)]`` (MatMulNBits layout). Returns ``(nodes, initializers)``."""
    from onnx import helper, numpy_helper
    inits = [numpy_helper.from_array(packed, f"{prefix}.q"),
             numpy_helper.from_array(scales.astype(np.float32), f"{prefix}.scales"),
             numpy_helper.from_array(zeros, f"{prefix}.zeros")]
    attrs = dict(K=k, N=n, bits=4, block_size=block_size)
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", [x, f"{prefix}.q", f"{prefix}.scales", f"{prefix}.zeros"], [y],
                            domain=MS_DOMAIN, name=f"{prefix}.matmul_nbits", **attrs)
    return [node], inits


def dequant_int8_nodes(out: str, prefix: str, q: np.ndarray, scales: np.ndarray, axis: int):
    """``out = DequantizeLinear(q int8, scales float32, axis)``. Feeding ``out`` straight into MatMul lets ORT
    (ORT_ENABLE_EXTENDED+) fuse it into a dynamic-activation-quantization int8 kernel (and ORT never
    constant-folds DequantizeLinear); :func:`cast_dequant_nodes` is the exact, folded weight-only form."""
    from onnx import helper, numpy_helper
    inits = [numpy_helper.from_array(q.astype(np.int8), f"{prefix}.q"),
             numpy_helper.from_array(scales.astype(np.float32), f"{prefix}.scales")]
    return [helper.make_node("DequantizeLinear", [f"{prefix}.q", f"{prefix}.scales"], [out], axis=axis,
                             name=f"{prefix}.dq")], inits


def cast_dequant_nodes(out: str, prefix: str, q: np.ndarray, scales: np.ndarray, axis: int):
    """``out = Cast(q int8 -> float) * scales`` (scales broadcast along ``axis``): constant-folded by ORT."""
    from onnx import helper, numpy_helper
    shape = [1, -1] if axis == 1 else [-1, 1]
    inits = [numpy_helper.from_array(q.astype(np.int8), f"{prefix}.q"),
             numpy_helper.from_array(scales.astype(np.float32).reshape(shape), f"{prefix}.scales")]
    return [helper.make_node("Cast", [f"{prefix}.q"], [f"{prefix}.qf"], to=1),
            helper.make_node("Mul", [f"{prefix}.qf", f"{prefix}.scales"], [out])], inits


def dequant_fp8_nodes(out: str, prefix: str, bits: np.ndarray, scales: np.ndarray, axis: int):
    """``out = LUT[bits] * scales`` for fp8 e4m3fn codes stored as uint8 bit patterns (opset 13+)."""
    from onnx import helper, numpy_helper
    shape = [1, -1] if axis == 1 else [-1, 1]
    inits = [numpy_helper.from_array(bits.astype(np.uint8), f"{prefix}.q"),
             numpy_helper.from_array(scales.astype(np.float32).reshape(shape), f"{prefix}.scales"),
             numpy_helper.from_array(fp8_e4m3fn_table(), f"{prefix}.lut")]
    nodes = [helper.make_node("Cast", [f"{prefix}.q"], [f"{prefix}.idx"], to=6),
             helper.make_node("Gather", [f"{prefix}.lut", f"{prefix}.idx"], [f"{prefix}.vals"], axis=0),
             helper.make_node("Mul", [f"{prefix}.vals", f"{prefix}.scales"], [out])]
    return nodes, inits


def dynamic_int8_matmul_nodes(x: str, y: str, prefix: str, q: np.ndarray, scales: np.ndarray):
    """``y ~ x @ (q * scales)`` with the activations quantized per tensor at run time (uint8):
    DynamicQuantizeLinear -> MatMulInteger (int32) -> Cast -> Mul by ``x_scale * scales``. ``q int8 [K, N]``.
    Numerically NOT weight-only (adds activation quantization error); offered for the speed comparison."""
    from onnx import helper, numpy_helper
    inits = [numpy_helper.from_array(q.astype(np.int8), f"{prefix}.q"),
             numpy_helper.from_array(scales.astype(np.float32), f"{prefix}.scales")]
    p = prefix
    nodes = [helper.make_node("DynamicQuantizeLinear", [x], [f"{p}.xq", f"{p}.xs", f"{p}.xz"]),
             helper.make_node("MatMulInteger", [f"{p}.xq", f"{p}.q", f"{p}.xz"], [f"{p}.acc"]),
             helper.make_node("Cast", [f"{p}.acc"], [f"{p}.accf"], to=1),
             helper.make_node("Mul", [f"{p}.xs", f"{p}.scales"], [f"{p}.cs"]),
             helper.make_node("Mul", [f"{p}.accf", f"{p}.cs"], [y])]
    return nodes, inits


def quant_linear_model(kind: str, k: int, n: int, weights: dict, opset: int = 18):
    """One-layer ONNX model ``Y = X @ W`` (X float32 ``[M, K]``) for tests and micro-benchmarks.

    ``kind``: ``fp32`` (``weights["w"]``), ``int8-cast`` / ``int8-dq-fused`` / ``int8-dynamic`` (``q``, ``scales``),
    ``fp8-lut`` (``bits``, ``scales``), ``int4-nbits`` (``packed``, ``scales``, ``zeros``, ``block_size``)."""
    from onnx import TensorProto, helper, numpy_helper
    nodes, inits = [], []
    if kind == "fp32":
        inits = [numpy_helper.from_array(weights["w"].astype(np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["X", "w"], ["Y"])]
    elif kind == "int8-dq-fused":
        nodes, inits = dequant_int8_nodes("w", "w", weights["q"], weights["scales"], axis=1)
        nodes.append(helper.make_node("MatMul", ["X", "w"], ["Y"]))
    elif kind == "int8-cast":
        nodes, inits = cast_dequant_nodes("w", "w", weights["q"], weights["scales"], axis=1)
        nodes.append(helper.make_node("MatMul", ["X", "w"], ["Y"]))
    elif kind == "fp8-lut":
        nodes, inits = dequant_fp8_nodes("w", "w", weights["bits"], weights["scales"], axis=1)
        nodes.append(helper.make_node("MatMul", ["X", "w"], ["Y"]))
    elif kind == "int8-dynamic":
        nodes, inits = dynamic_int8_matmul_nodes("X", "Y", "w", weights["q"], weights["scales"])
    elif kind == "int4-nbits":
        nodes, inits = matmul_nbits_node("X", "Y", "w", weights["packed"], weights["scales"], weights["zeros"], k, n,
                                         weights["block_size"], weights.get("accuracy_level"))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
