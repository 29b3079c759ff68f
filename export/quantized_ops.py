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
   once at session start (the file keeps the 1-byte / 4-bit form); ``MatMulNBits`` stays 4-bit at run time.
   V's values are dequantized in-graph to float and then fed to ``rocket::sparse_v_matmul`` with ``value_type=0``,
   so the existing lowering (:func:`rocket_deploy.export.lowering.lower_rocket_nodes`) applies unchanged.

2. **graph side** (``onnx.helper``): :func:`matmul_nbits_node`, :func:`dequant_int8_nodes`,
   :func:`cast_dequant_nodes`, :func:`dequant_fp8_nodes`, :func:`dynamic_int8_matmul_nodes` build the same ops as NodeProtos + initializers;
   :func:`quant_linear_model` assembles a one-layer model (used by bench/bench_quant_ops.py and the tests).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rocket_deploy.compress.quantize import dequant_int4
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear

MS_DOMAIN = "com.microsoft"


def fp8_e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (NaN codes 0x7F / 0xFF -> NaN)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()


# ----------------------------------------------------------------------------------------------- torch custom ops
@torch.library.custom_op("rocket_quant::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 K: int, N: int, block_size: int) -> torch.Tensor:
    """``x @ W`` with ``W [K, N]`` in MatMulNBits layout (reference: dequantize and multiply)."""
    w = dequant_int4(packed.cpu(), scales.cpu(), zeros.cpu(), K, x.dtype).to(x.device)
    return torch.matmul(x, w)


@matmul_nbits.register_fake
def _(x, packed, scales, zeros, K, N, block_size):
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


def _onnx_matmul_nbits(x, packed, scales, zeros, K: int, N: int, block_size: int):
    register_matmul_nbits_schema()
    import onnxscript
    from onnxscript import opset18 as op
    ms = onnxscript.values.Opset(MS_DOMAIN, 1)
    return ms.MatMulNBits(x, packed, op.CastLike(scales, x), zeros, K=K, N=N, bits=4, block_size=block_size)


def _onnx_dequant_cols(q, scales, axis: int):
    from onnxscript import opset18 as op
    s = op.Unsqueeze(scales, op.Constant(value_ints=[0 if axis == 1 else 1]))
    return op.Mul(op.Cast(q, to=1), s)                        # 1 = FLOAT; constant-folded by ORT


def _onnx_dequant_linear(q, scales, axis: int):
    from onnxscript import opset18 as op
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
            torch.ops.rocket_quant.dequant_fp8.default: _onnx_dequant_fp8}


# ---------------------------------------------------------------------------------------- export stand-in modules
def _register_matrix(mod: nn.Module, prefix: str, fmt: str, q, scales, zeros) -> None:
    if fmt == "fp8":
        q = q.view(torch.uint8)              # bit patterns: decoded by the LUT in-graph
    mod.register_buffer(f"{prefix}_q", q)
    mod.register_buffer(f"{prefix}_scales", scales.to(torch.float32) if fmt != "int4" else scales)
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


class ExportQuantRocketLinear(nn.Module):
    """Export-time stand-in for :class:`QuantRocketLinear` (shares its tensors). ``x @ U`` is MatMulNBits (int4)
    or MatMul with a DequantizeLinear'd / LUT-decoded U; V's values are dequantized to float32 and the sparse
    product is ``rocket::sparse_v_matmul(..., value_type=0)`` as for unquantized layers.
    ``int8_fused``: see :func:`_weight` (default False: exact)."""

    def __init__(self, src: QuantRocketLinear, int8_fused: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.keep = src.in_features, src.out_features, src.rank, src.keep
        self.u_fmt, self.v_fmt, self.group = src.u_fmt, src.v_fmt, src.group
        self.fused = int8_fused and self.u_fmt == "int8"
        _register_matrix(self, "u", self.u_fmt, src.u_q, src.u_scales, src.u_zeros)
        vals = src.v_values.view(torch.uint8) if self.v_fmt == "fp8" else src.v_values
        self.register_buffer("v_values_q", vals)
        self.register_buffer("v_scales", src.v_scales)
        self.register_buffer("v_mask", src.v_mask.to(torch.uint8))
        self.register_buffer("bias", src.bias.to(torch.float32) if src.bias is not None else None)

    def forward(self, x):
        if self.u_fmt == "int4":
            t = torch.ops.rocket_quant.matmul_nbits(x, self.u_q, self.u_scales, self.u_zeros, self.in_features,
                                                    self.rank, self.group)
        else:
            t = torch.matmul(x, _weight(self.u_fmt, self.u_q, self.u_scales, self.fused, 1).to(x.dtype))
        v_vals = _dequant(self.v_fmt, self.v_values_q, self.v_scales, 0).to(x.dtype)     # [d_out, keep]
        import rocket_deploy.export.rocket_op  # noqa: F401  (registers rocket::sparse_v_matmul)
        y = torch.ops.rocket.sparse_v_matmul(t, v_vals, self.v_mask, self.rank, self.keep, self.out_features, 0)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class ExportQuantDenseLinear(nn.Module):
    """Export-time stand-in for :class:`QuantDenseLinear`: MatMulNBits (int4), or MatMul with the weight
    dequantized in-graph (``w_q [d_out, d_in]`` per-row scales, transposed; folded at session start)."""

    def __init__(self, src: QuantDenseLinear, int8_fused: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.group = src.in_features, src.out_features, src.fmt, src.group
        self.fused = int8_fused and self.fmt == "int8"
        wq = src.w_q.t().contiguous() if self.fused else src.w_q       # stored [d_out, d_in]
        _register_matrix(self, "w", self.fmt, wq, src.w_scales, src.w_zeros)
        self.register_buffer("bias", src.bias.to(torch.float32) if src.bias is not None else None)

    def forward(self, x):
        if self.fmt == "int4":
            y = torch.ops.rocket_quant.matmul_nbits(x, self.w_q, self.w_scales, self.w_zeros, self.in_features,
                                                    self.out_features, self.group)
        else:
            w = _weight(self.fmt, self.w_q, self.w_scales, self.fused, 0)
            y = torch.matmul(x, (w if self.fused else w.t()).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def export_module_for(mod: nn.Module, int8_fused: bool = False) -> nn.Module | None:
    """The export stand-in of a quantized module, or None when ``mod`` is not quantized."""
    if isinstance(mod, QuantRocketLinear):
        return ExportQuantRocketLinear(mod, int8_fused)
    if isinstance(mod, QuantDenseLinear):
        return ExportQuantDenseLinear(mod, int8_fused)
    return None


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
