"""Export stand-ins of quantized layers for the ``trt`` target (weight-only Q/DQ + the plugin node).

* U / dense W int8 / fp8: ``MatMul(x, DequantizeLinear(q, scales in the compute dtype, axis=1))`` (symmetric, no
  zero point: TensorRT only takes symmetric Q/DQ);
* U / dense W int4: ``MatMulNBits`` here, rewritten after the export by :func:`.trt_graph.prepare_trt_graph` into
  a symmetric INT4 blocked ``DequantizeLinear`` plus a zero-point correction (TensorRT only takes zero points of 0);
* V: ``RocketSparseVMatMul`` with the stored int8 / float8e4m3fn codes, the bitmask and the float32 per-column
  scales as 4th input, ``value_type`` 1 (int8) / 2 (fp8) -- the plugin's contract
  (:mod:`rocket_deploy.onnx_contract`).
"""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.onnx_contract import VALUE_TYPE_FP8, VALUE_TYPE_INT8
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear

from . import quant_ops  # noqa: F401  (registers the rocket_quant ops)
from . import rocket_op  # noqa: F401  (registers rocket::sparse_v_matmul)
from .quant_ort import bias_in

_VALUE_TYPE = {"int8": VALUE_TYPE_INT8, "fp8": VALUE_TYPE_FP8}


class TrtQuantRocketLinear(nn.Module):
    """Export-time stand-in for :class:`QuantRocketLinear`, ``trt`` target (see the module doc)."""

    def __init__(self, src: QuantRocketLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.keep = src.in_features, src.out_features, src.rank, src.keep
        # int4s V values go to the plugin widened to int8 codes (it has no 4-bit value path): same product
        self.u_fmt, self.v_fmt, self.group = src.u_fmt, src.v_code_fmt, src.group
        self.value_type = _VALUE_TYPE[self.v_fmt]
        self.register_buffer("u_q", src.u_q)
        self.register_buffer("u_scales", src.u_scales.to(dtype))
        self.register_buffer("u_zeros", src.u_zeros)
        self.register_buffer("v_values", src.v_codes())                 # int8 / float8_e4m3fn codes
        self.register_buffer("v_scales", src.v_scales.to(torch.float32))
        self.register_buffer("v_mask", src.v_mask.to(torch.uint8))
        self.register_buffer("bias", bias_in(src, dtype))

    def forward(self, x):
        if self.u_fmt == "int4":
            t = torch.ops.rocket_quant.matmul_nbits(x, self.u_q, self.u_scales, self.u_zeros, self.in_features,
                                                    self.rank, self.group, 0)
        else:
            t = torch.matmul(x, torch.ops.rocket_quant.dequantize_linear(self.u_q, self.u_scales, 1))
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
        self.register_buffer("bias", bias_in(src, dtype))

    def forward(self, x):
        if self.fmt == "int4":
            y = torch.ops.rocket_quant.matmul_nbits(x, self.w_q, self.w_scales, self.w_zeros, self.in_features,
                                                    self.out_features, self.group, 0)
        else:
            y = torch.matmul(x, torch.ops.rocket_quant.dequantize_linear(self.w_q, self.w_scales, 1))
        if self.bias is not None:
            y = y + self.bias
        return y
