"""The sparse ROCKET product as a ``torch.library`` custom op and its ONNX translation.

``rocket::sparse_v_matmul(t, values, mask, rank, keep, out_features, value_type, scales=None)`` computes ``t @ V``
where ``V`` (``rank x out_features``) is stored in the packed per-column form of :mod:`rocket_deploy.sparse_format`:
``values [out_features, keep]`` and ``mask uint8 [out_features, ceil(rank/8)]`` (all ones when ``keep == rank``);
for quantized V (``value_type`` 1 / 2) ``values`` are int8 / float8_e4m3fn codes and ``scales`` float32
``[out_features]`` (``V[i, j] = code * scales[j]``).

The ONNX translation emits ONE node ``RocketSparseVMatMul`` in domain ``rocket`` -- the op the TensorRT plugin
implements (creator ``RocketSparseVMatMul``, namespace ``rocket``, version ``1``)::

    RocketSparseVMatMul(t [..., rank], values [out_features, keep], mask uint8 [out_features, ceil(rank/8)]
                        [, scales float32 [out_features]  -- only when value_type != 0])
      attributes: plugin_version="1", plugin_namespace="rocket", rank, keep, out_features, value_type
      value_type: 0 = values in the activation dtype, 1 = int8 + per-column scales, 2 = fp8 e4m3 + scales

For the ``ort`` target, :mod:`rocket_deploy.export.lowering` replaces that node by standard ONNX ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from rocket_deploy.onnx_contract import (ONNX_DOMAIN, ONNX_OP, OP_OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION,
                                         VALUE_TYPES)
from rocket_deploy.onnx_contract import TORCH_OP as OP_NAME
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import full_mask, unpack_v

QUANT_VALUE_DTYPES = {1: torch.int8, 2: torch.float8_e4m3fn}


@torch.library.custom_op(OP_NAME, mutates_args=())
def sparse_v_matmul(t: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, rank: int, keep: int,
                    out_features: int, value_type: int, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference implementation (eager): expand V and multiply.

    ``value_type`` 0: ``values`` in any float dtype, ``y = t @ V`` in ``t``'s dtype. 1 / 2: ``values`` int8 /
    float8_e4m3fn codes and ``scales`` float32 ``[out_features]``: as the plugin does, the codes are expanded
    exactly, accumulated in float32 and each column is scaled once at the end (``y = (t @ V_codes) * scales``),
    then rounded to ``t``'s dtype."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"value_type must be one of {sorted(VALUE_TYPES)}, got {value_type}")
    if value_type != 0:
        want = QUANT_VALUE_DTYPES[value_type]
        if values.dtype != want:
            raise ValueError(f"value_type={value_type} needs {want} values, got {values.dtype}")
        if scales is None or tuple(scales.shape) != (out_features,):
            raise ValueError(f"value_type={value_type} needs scales [out_features={out_features}], got "
                             f"{None if scales is None else tuple(scales.shape)}")
        vals = values.to(torch.float32)
    else:
        vals = values
    if keep == rank:
        v = vals.t()
    else:
        v = unpack_v(vals.cpu(), mask.cpu(), rank).to(t.device)
    if value_type == 0:
        return torch.matmul(t, v.to(t.dtype))
    y = torch.matmul(t.to(torch.float32), v) * scales.to(device=t.device, dtype=torch.float32)
    return y.to(t.dtype)


@sparse_v_matmul.register_fake
def _(t, values, mask, rank, keep, out_features, value_type, scales=None):
    return t.new_empty((*t.shape[:-1], out_features))


def onnx_translation(t, values, mask, rank: int, keep: int, out_features: int, value_type: int, scales=None):
    """onnxscript translation of ``rocket::sparse_v_matmul``: one ``rocket.RocketSparseVMatMul`` node (with the
    4th input ``scales`` when ``value_type != 0``)."""
    import onnxscript

    from .schema import register_rocket_schema
    register_rocket_schema()
    rocket = onnxscript.values.Opset(ONNX_DOMAIN, OP_OPSET_VERSION)
    inputs = (t, values, mask) if value_type == 0 else (t, values, mask, scales)
    return getattr(rocket, ONNX_OP)(*inputs, plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE,
                                    rank=rank, keep=keep, out_features=out_features, value_type=value_type)


def custom_translation_table() -> dict:
    return {torch.ops.rocket.sparse_v_matmul.default: onnx_translation}


class ExportRocketLinear(nn.Module):
    """Export-time stand-in for :class:`RocketLinear`: ``(x @ U)`` as a plain MatMul, then the custom op.
    Shares the original's tensors (no copy)."""

    def __init__(self, src: RocketLinear):
        super().__init__()
        self.rank, self.keep, self.out_features = src.rank, src.keep, src.out_features
        mask = src.v_mask if src.v_mask is not None and src.v_mask.numel() else full_mask(src.rank, src.out_features)
        self.register_buffer("u", src.u)
        self.register_buffer("v_values", src.v_values)
        self.register_buffer("v_mask", mask.to(torch.uint8))
        self.register_buffer("bias", src.bias)

    def forward(self, x):
        t = torch.matmul(x, self.u)
        y = torch.ops.rocket.sparse_v_matmul(t, self.v_values, self.v_mask, self.rank, self.keep,
                                             self.out_features, 0)
        if self.bias is not None:
            y = y + self.bias
        return y
