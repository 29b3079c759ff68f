"""Quantized layers of a ``--quantize`` artifact (format version 2), run in torch with dequant-on-first-forward.

* :class:`QuantRocketLinear` -- ``y = (x U) V + b`` with ``U`` int8 / fp8 (one float32 scale per rank
  component) or int4 (MatMulNBits layout, groups along d_in) and ``V``'s packed values int8 / fp8 (or 4-bit
  ``int4s`` nibbles) with one float32 scale per output column (same bitmask as
  :class:`~rocket_deploy.rocket_linear.RocketLinear`).
* :class:`QuantDenseLinear` -- an uncompressed layer whose weight is quantized the same way (per output channel,
  or group-wise int4): the ``dense-quant`` baseline and the knapsack's dense option under ``--quantize``.

The stored tensors keep their dtypes exactly: ``.to(dtype)`` / ``.half()`` on the model only move them between
devices (the quantized representation is never re-rounded). The dequantized weights are cached per device and
compute dtype. Layouts: :mod:`rocket_deploy.quant_format` and docs/quantization.md.
"""
from __future__ import annotations

import torch
from torch import nn

from .quant_format import V_BITS, dequant_matrix, n_groups, u_format, unpack_v_int4s, v_format
from .sparse_format import full_mask, mask_bytes_per_column, unpack_v

_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def _matrix_buffers(k: int, n: int, fmt: str, group: int) -> dict[str, torch.Tensor | None]:
    """Empty storage for a ``K x N`` matrix in ``fmt`` (see rocket_deploy/quant_format.py)."""
    if fmt == "int4":
        nb = n_groups(k, group)
        return {"q": torch.zeros(n, nb, group // 2, dtype=torch.uint8),
                "scales": torch.zeros(n, nb, dtype=torch.float16),
                "zeros": torch.zeros(n, (nb + 1) // 2, dtype=torch.uint8)}
    return {"q": torch.zeros(k, n, dtype=_STORAGE[fmt]), "scales": torch.zeros(n, dtype=torch.float32), "zeros": None}


class _QuantBase(nn.Module):
    _QUANT_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {n: b for n, b in self._buffers.items() if n in self._QUANT_BUFFERS and b is not None}
        super()._apply(fn, recurse)
        for n, old in saved.items():          # device moves only: never re-round quantized codes or scales
            new = self._buffers[n]
            if new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        self._cache = {}
        return self

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            cur = getattr(self, name)
            if cur is None:
                raise ValueError(f"{type(self).__name__} has no tensor {name!r}")
            if tuple(t.shape) != tuple(cur.shape) or t.dtype != cur.dtype:
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, expected {cur.dtype} {tuple(cur.shape)}")
            setattr(self, name, t.contiguous())
        self._cache = {}

    def _cached(self, key: str, dtype: torch.dtype, make):
        k = (key, dtype, self._buffers[self._QUANT_BUFFERS[0]].device)
        v = self._cache.get(k)
        if v is None:
            v = make(dtype)
            self._cache[k] = v
        return v


class QuantRocketLinear(_QuantBase):
    _QUANT_BUFFERS = ("u_q", "u_scales", "u_zeros", "v_values", "v_scales", "v_mask")

    def __init__(self, d_in: int, d_out: int, rank: int, keep: int, scheme: str, group: int = 128,
                 bias: bool = False, bias_dtype: torch.dtype = torch.float16, v_fmt: str | None = None):
        super().__init__()
        if not (0 < keep <= rank):
            raise ValueError(f"keep must be in [1, rank={rank}], got {keep}")
        self.in_features, self.out_features, self.rank, self.keep = d_in, d_out, rank, keep
        self.scheme, self.group = scheme, group
        self.u_fmt = u_format(scheme)
        formats = {v_format(scheme, b) for b in V_BITS if b == 8 or scheme == "int4"}
        self.v_fmt = v_fmt or v_format(scheme)
        if self.v_fmt not in formats:
            raise ValueError(f"V's values cannot be {self.v_fmt!r} under the {scheme} scheme (one of {sorted(formats)})")
        ub = _matrix_buffers(d_in, rank, self.u_fmt, group)
        self.register_buffer("u_q", ub["q"])
        self.register_buffer("u_scales", ub["scales"])
        self.register_buffer("u_zeros", ub["zeros"])
        self.register_buffer("v_values", torch.zeros(d_out, (keep + 1) // 2, dtype=torch.uint8) if self.v_fmt == "int4s"
                             else torch.zeros(d_out, keep, dtype=_STORAGE[self.v_fmt]))
        self.register_buffer("v_scales", torch.zeros(d_out, dtype=torch.float32))
        self.register_buffer("v_mask", full_mask(rank, d_out) if keep == rank
                             else torch.zeros(d_out, mask_bytes_per_column(rank), dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(d_out, dtype=bias_dtype) if bias else None)
        self._cache = {}

    @property
    def is_dense_v(self) -> bool:
        return self.keep == self.rank

    @classmethod
    def from_quantized(cls, qf, d_in: int, d_out: int, bias: torch.Tensor | None = None) -> "QuantRocketLinear":
        """From a :class:`rocket_deploy.compress.quantize.QuantFactors`."""
        mod = cls(d_in, d_out, qf.rank, qf.keep, qf.scheme, qf.u.group or 128, bias is not None,
                  bias.dtype if bias is not None else torch.float16, v_format(qf.scheme, qf.v_bits))
        t = {"u_q": qf.u.q, "u_scales": qf.u.scales, "v_values": qf.v_values, "v_scales": qf.v_scales,
             "v_mask": qf.v_mask}
        if qf.u.zeros is not None:
            t["u_zeros"] = qf.u.zeros
        if bias is not None:
            t["bias"] = bias
        mod._load(t)
        return mod

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set from the stored tensors (``v_mask`` may be omitted when keep == rank)."""
        if "v_mask" not in tensors and not self.is_dense_v:
            raise ValueError("a sparse V (keep < rank) needs its bitmask")
        self._load(tensors)

    def dense_u(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._cached("u", dtype, lambda dt: dequant_matrix(self.u_fmt, self.u_q, self.u_scales, self.u_zeros,
                                                                 self.in_features, dt))

    @property
    def v_code_fmt(self) -> str:
        """Format of :meth:`v_codes`: int8 for int4s (the 4-bit codes widened), else :attr:`v_fmt`."""
        return "int8" if self.v_fmt == "int4s" else self.v_fmt

    def v_codes(self) -> torch.Tensor:
        """V's kept-value codes ``[d_out, keep]`` one byte each (int8 / float8_e4m3fn): what export targets and
        kernels taking 1-byte values read (int4s nibbles widened to int8 codes -7..7, same scales)."""
        if self.v_fmt == "int4s":
            return unpack_v_int4s(self.v_values, self.keep)
        return self.v_values

    def dense_v(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        def make(dt):
            vals = self.v_codes().to(dt) * self.v_scales.to(dt)[:, None]         # [d_out, keep]
            if self.is_dense_v:
                return vals.t().contiguous()
            return unpack_v(vals.cpu(), self.v_mask.cpu(), self.rank).to(self.v_values.device)
        return self._cached("v", dtype, make)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dense_u(dtype) @ self.dense_v(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype if x.is_floating_point() else torch.float32
        y = torch.matmul(torch.matmul(x, self.dense_u(dt)), self.dense_v(dt))
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"keep={self.keep}, scheme={self.scheme}, v={self.v_fmt}, bias={self.bias is not None}")


class QuantDenseLinear(_QuantBase):
    """``y = x W^T + b`` with ``W [d_out, d_in]`` stored as ``w_q`` (int8 / fp8 ``[d_out, d_in]`` + float32
    ``w_scales [d_out]``, i.e. nn.Linear's layout, one scale per output channel) or int4 MatMulNBits layout
    (``w_q uint8 [d_out, nb, group/2]``, ``w_scales float16 [d_out, nb]``, ``w_zeros``)."""
    _QUANT_BUFFERS = ("w_q", "w_scales", "w_zeros")

    def __init__(self, d_in: int, d_out: int, scheme: str, group: int = 128, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group = d_in, d_out, scheme, group
        self.fmt = u_format(scheme)
        wb = _matrix_buffers(d_in, d_out, self.fmt, group)
        q = wb["q"] if self.fmt == "int4" else wb["q"].t().contiguous()
        self.register_buffer("w_q", q)
        self.register_buffer("w_scales", wb["scales"])
        self.register_buffer("w_zeros", wb["zeros"])
        self.register_buffer("bias", torch.zeros(d_out, dtype=bias_dtype) if bias else None)
        self._cache = {}

    @classmethod
    def from_quantized(cls, qm, bias: torch.Tensor | None = None) -> "QuantDenseLinear":
        """From a :class:`rocket_deploy.compress.quantize.QuantMatrix` of the ``d_in x d_out`` weight."""
        mod = cls(qm.k, qm.n, qm.fmt, qm.group or 128, bias is not None,
                  bias.dtype if bias is not None else torch.float16)
        t = {"w_q": qm.q if qm.fmt == "int4" else qm.q.t(), "w_scales": qm.scales}
        if qm.zeros is not None:
            t["w_zeros"] = qm.zeros
        if bias is not None:
            t["bias"] = bias
        mod._load(t)
        return mod

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        self._load(tensors)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W`` as ``d_in x d_out`` (``y = x W``)."""
        def make(dt):
            q = self.w_q if self.fmt == "int4" else self.w_q.t()
            return dequant_matrix(self.fmt, q, self.w_scales, self.w_zeros, self.in_features, dt).contiguous()
        return self._cached("w", dtype, make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype if x.is_floating_point() else torch.float32
        y = torch.matmul(x, self.dense_weight(dt))
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, bias={self.bias is not None}"


QUANT_MODULES = (QuantRocketLinear, QuantDenseLinear)


def quant_state_keys(module: nn.Module) -> list[str]:
    """Buffer names of a quantized module that are stored in factors.safetensors."""
    return [n for n in module._QUANT_BUFFERS + ("bias",) if getattr(module, n, None) is not None]


def compressed_layer(rec: dict, dtype: torch.dtype, storage_dtype: torch.dtype) -> nn.Module:
    """The empty module of one compressed layer record of ``rocket.json`` (``kind``, ``d_in``, ``d_out``, ``rank``,
    ``keep``, ``has_bias``, ``quant``): a Quant* layer when ``quant`` is set (bias in the storage dtype), else a
    :class:`~rocket_deploy.rocket_linear.RocketLinear` in ``dtype``. Used by the artifact loader and the
    transformers quantizer, so both build the very same modules."""
    from .rocket_linear import RocketLinear
    q = rec.get("quant")
    if q:
        group = q.get("group_size") or 128
        if rec["kind"] == "rocket":
            return QuantRocketLinear(rec["d_in"], rec["d_out"], rec["rank"], rec["keep"], q["scheme"], group,
                                     bias=rec["has_bias"], bias_dtype=storage_dtype, v_fmt=q.get("v"))
        return QuantDenseLinear(rec["d_in"], rec["d_out"], q["scheme"], group, bias=rec["has_bias"],
                                bias_dtype=storage_dtype)
    return RocketLinear(rec["d_in"], rec["d_out"], rec["rank"], rec["keep"], bias=rec["has_bias"], dtype=dtype)
