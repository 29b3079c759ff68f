"""``RocketLinear``: the drop-in replacement for a compressed ``nn.Linear``.

Holds ``U`` dense and ``V`` in the packed per-column form of :mod:`rocket_deploy.sparse_format`; computes
``y = (x U) V + b``. On CUDA, when a sparse-V kernel has been registered (:func:`register_cuda_kernel`; the
runtime registers its compiled kernels, ``rocket_deploy.runtime.kernels``, when they are available), the sparse
product runs straight from the packed form; elsewhere ``V`` is expanded once and cached. This module is shared
ground: it defines the slot and never imports the runtime.
"""
from __future__ import annotations

import torch
from torch import nn

from .sparse_format import full_mask, pack_v, unpack_v


# fn(t, v_values, v_mask, rank) -> t @ V on CUDA tensors, or None to fall back to the expanded V.
_CUDA_SPARSE_V = None


def register_cuda_kernel(fn) -> None:
    """Install (or with None remove) the CUDA sparse-V product every RocketLinear uses on CUDA tensors."""
    global _CUDA_SPARSE_V
    _CUDA_SPARSE_V = fn


class RocketLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, keep: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not (0 < keep <= rank):
            raise ValueError(f"keep must be in [1, rank={rank}], got {keep}")
        self.in_features, self.out_features, self.rank, self.keep = d_in, d_out, rank, keep
        self.register_buffer("u", torch.zeros(d_in, rank, dtype=dtype, device=device))
        self.register_buffer("v_values", torch.zeros(d_out, keep, dtype=dtype, device=device))
        self.register_buffer("v_mask", full_mask(rank, d_out).to(device) if keep == rank
                             else torch.zeros(d_out, (rank + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(d_out, dtype=dtype, device=device) if bias else None)
        self._dense_v: torch.Tensor | None = None

    @property
    def is_dense_v(self) -> bool:
        return self.keep == self.rank

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, keep_mask: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "RocketLinear":
        """Build from ``U`` (d_in x r), ``V`` (r x d_out) and the boolean keep mask of V (None: dense V)."""
        d_in, r = u.shape
        d_out = v.shape[1]
        if keep_mask is None:
            keep_mask = torch.ones_like(v, dtype=torch.bool)
        k = int(keep_mask[:, 0].sum()) if d_out else r
        mod = cls(d_in, d_out, r, k, bias=bias is not None, dtype=dtype)
        values, mask = pack_v(v.to(dtype), keep_mask)
        mod.load_packed(u.to(dtype), values, mask, bias)
        return mod

    def load_packed(self, u, values, mask=None, bias=None) -> None:
        """Set the factors from their stored form (mask may be omitted when k == r)."""
        if tuple(u.shape) != (self.in_features, self.rank):
            raise ValueError(f"U has shape {tuple(u.shape)}, expected {(self.in_features, self.rank)}")
        if tuple(values.shape) != (self.out_features, self.keep):
            raise ValueError(f"V values have shape {tuple(values.shape)}, expected {(self.out_features, self.keep)}")
        self.u = u.to(self.u.dtype).contiguous()
        self.v_values = values.contiguous() if not values.is_floating_point() else values.to(self.u.dtype).contiguous()
        if mask is not None:
            self.v_mask = mask.to(torch.uint8).contiguous()
        elif not self.is_dense_v:
            raise ValueError("a sparse V (keep < rank) needs its bitmask")
        if bias is not None:
            self.bias = bias.to(self.u.dtype).contiguous()
        self._dense_v = None

    def dense_v(self) -> torch.Tensor:
        """V as a dense ``r x d_out`` tensor (cached)."""
        v = self._dense_v
        if v is None or v.device != self.u.device or v.dtype != self.u.dtype:
            vals = self.v_values.to(self.u.dtype)
            if self.is_dense_v:
                v = vals.t().contiguous()
            else:
                v = unpack_v(vals.cpu(), self.v_mask.cpu(), self.rank).to(self.u.device)
            self._dense_v = v
        return v

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed ``d_in x d_out`` weight ``U V`` (for checks, not for inference)."""
        return self.u @ self.dense_v()

    def _apply(self, fn, recurse=True):
        self._dense_v = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.matmul(x.to(self.u.dtype), self.u)
        y = self._sparse_v_product(t)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _sparse_v_product(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_cuda and _CUDA_SPARSE_V is not None:
            y = _CUDA_SPARSE_V(t, self.v_values, self.v_mask, self.rank)
            if y is not None:
                return y
        return torch.matmul(t, self.dense_v())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"keep={self.keep}, bias={self.bias is not None}")
