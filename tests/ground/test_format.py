"""Packed V format and RocketLinear vs its dense reconstruction."""
import pytest
import torch

from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.sparse_format import factor_bytes, mask_bytes_per_column, pack_bits, pack_v, unpack_bits, unpack_v

from _rocket_fixtures import random_sparse_v


@pytest.mark.parametrize("r,k", [(8, 3), (13, 13), (64, 21), (100, 50), (9, 1)])
def test_pack_roundtrip(r, k):
    v, keep = random_sparse_v(r, 17, k)
    values, mask = pack_v(v, keep)
    assert values.shape == (17, k) and mask.shape == (17, mask_bytes_per_column(r)) and mask.dtype == torch.uint8
    assert torch.equal(unpack_v(values, mask, r), v)
    assert torch.equal(unpack_bits(mask, r), keep.t())


def test_bit_order_lsb_first():
    rows = torch.zeros(1, 10, dtype=torch.bool)
    rows[0, 0] = rows[0, 9] = True
    assert pack_bits(rows).tolist() == [[1, 2]]


def test_pack_rejects_ragged_columns():
    v = torch.ones(4, 2)
    keep = torch.tensor([[1, 1], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="same number"):
        pack_v(v, keep)


def test_bytes_formula():
    assert factor_bytes(576, 1536, 256, 128) == 576 * 256 * 2 + 1536 * (32 + 256)
    assert factor_bytes(576, 1536, 256, 256) == (576 + 1536) * 256 * 2     # dense V: no mask bytes


@pytest.mark.parametrize("k", [5, 16])
def test_rocket_linear_matches_dense_reconstruction(k):
    torch.manual_seed(0)
    u = torch.randn(24, 16, dtype=torch.float64)
    v, keep = random_sparse_v(16, 40, k)
    bias = torch.randn(40, dtype=torch.float64)
    mod = RocketLinear.from_factors(u, v.double(), keep if k < 16 else None, bias, dtype=torch.float64)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ref = x @ (u @ v.double()) + bias
    assert torch.allclose(mod(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(mod.dense_weight(), u @ v.double())
