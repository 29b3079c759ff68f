"""Export stand-ins of quantized layers for the ``ort`` target (standard ops + ``com.microsoft.MatMulNBits``).

:class:`ExportQuantRocketLinear` / :class:`ExportQuantDenseLinear` share the tensors of a
:class:`~rocket_deploy.quant_linear.QuantRocketLinear` / :class:`~rocket_deploy.quant_linear.QuantDenseLinear` and
compute with the ``rocket_quant`` ops of :mod:`.quant_ops`: int4 weights as one MatMulNBits (``accuracy_level`` as
given), int8 / fp8 weights dequantized in-graph (Cast/Mul or LUT, folded by ORT at session start) -- or, with
``int8_fused``, ``DequantizeLinear -> MatMul`` (ORT's dynamic int8 kernels). V's values are dequantized to float and
fed to ``rocket::sparse_v_matmul(..., value_type=0)``, so the standard-op lowering applies unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear

from . import quant_ops  # noqa: F401  (registers the rocket_quant ops)
from . import rocket_op  # noqa: F401  (registers rocket::sparse_v_matmul)


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


def bias_in(src: nn.Module, dtype: torch.dtype):
    """The layer's bias in the compute dtype (None without one)."""
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
        self.u_fmt, self.v_fmt, self.group = src.u_fmt, src.v_code_fmt, src.group       # int4s: int8 codes
        self.fused = int8_fused and self.u_fmt == "int8"
        self.accuracy_level = int(accuracy_level)
        _register_matrix(self, "u", self.u_fmt, src.u_q, src.u_scales, src.u_zeros, dtype)
        vals = src.v_codes()
        vals = vals.view(torch.uint8) if self.v_fmt == "fp8" else vals
        self.register_buffer("v_values_q", vals)
        self.register_buffer("v_scales", src.v_scales)
        self.register_buffer("v_mask", src.v_mask.to(torch.uint8))
        self.register_buffer("bias", bias_in(src, dtype))

    def forward(self, x):
        if self.u_fmt == "int4":
            t = torch.ops.rocket_quant.matmul_nbits(x, self.u_q, self.u_scales, self.u_zeros, self.in_features,
                                                    self.rank, self.group, self.accuracy_level)
        else:
            t = torch.matmul(x, _weight(self.u_fmt, self.u_q, self.u_scales, self.fused, 1).to(x.dtype))
        v_vals = _dequant(self.v_fmt, self.v_values_q, self.v_scales, 0).to(x.dtype)     # [d_out, keep]
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
        self.register_buffer("bias", bias_in(src, dtype))

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
