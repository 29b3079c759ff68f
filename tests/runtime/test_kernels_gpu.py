"""The rocket CUDA kernels (torch extension built from plugins_trt/kernels) against a float64 reference.

Needs a CUDA GPU and nvcc (skipped cleanly otherwise). The default grid is small; set ROCKET_FULL_KERNEL_GRID=1 for
r in {64, 256, 1024, 4096} x k/r in {1/3, 1/2, 2/3, 1} x rows in {1, 2, 8, 64, 512, 4096} x fp16 / fp32 / bf16.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from rocket_deploy.sparse_format import full_mask, pack_v, unpack_bits, unpack_v

pytestmark = pytest.mark.gpu

FULL = os.environ.get("ROCKET_FULL_KERNEL_GRID", "") not in ("", "0")
RANKS = [64, 256, 1024, 4096] if FULL else [64, 1024]
FRACS = [1 / 3, 1 / 2, 2 / 3, 1.0] if FULL else [1 / 3, 1.0]
ROWS = [1, 2, 8, 64, 512, 4096] if FULL else [1, 8, 64, 512]
DTYPES = [torch.float16, torch.float32, torch.bfloat16]
D_OUT = 200  # not a multiple of the GEMM's 128-column tile nor of the decode block's columns
# Elementwise |got - ref| <= RTOL * |ref| + ATOL * max|ref|: output rounding of the dtype plus fp32 accumulation.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from rocket_deploy.runtime import kernel_ext
    try:
        return kernel_ext.load_extension()
    except RuntimeError as e:
        if "nvcc was not found" in str(e):
            pytest.skip(str(e))
        raise


def _skip_unsupported(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 needs sm_80+")


def make_layer(rank, keep, d_out, dtype, value_type=0, seed=0, device="cuda"):
    """Random packed V. Returns (values, mask, scales, dense V float64 [rank, d_out]) on device."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rank, d_out, generator=g)
    scores = torch.rand(rank, d_out, generator=g)
    keep_mask = torch.zeros(rank, d_out, dtype=torch.bool)
    keep_mask.scatter_(0, scores.topk(keep, dim=0).indices, True)
    values, mask = pack_v(v, keep_mask)
    scales = None
    if value_type == 0:
        values = values.to(dtype)
        deq = values.double()
    elif value_type == 1:
        scales = values.abs().amax(dim=1).clamp_min(1e-6) / 127.0
        values = torch.round(values / scales[:, None]).clamp(-127, 127).to(torch.int8)
        deq = values.double() * scales.double()[:, None]
    else:
        scales = values.abs().amax(dim=1).clamp_min(1e-6) / 448.0
        values = (values / scales[:, None]).to(torch.float8_e4m3fn)
        deq = values.double() * scales.double()[:, None]
    dense = unpack_v(deq, mask, rank)
    if keep == rank:
        assert torch.equal(mask, full_mask(rank, d_out))
    to = (lambda x: None if x is None else x.to(device))
    return to(values), to(mask), to(scales), dense.to(device)


def check(got, t, dense_v):
    ref = t.double() @ dense_v
    rtol, atol = TOL[t.dtype]
    scale = ref.abs().max().item() or 1.0
    err = (got.double() - ref).abs()
    bound = rtol * ref.abs() + atol * scale
    worst = (err / bound).max().item()
    assert got.dtype == t.dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds tolerance (worst ratio {worst:.2f}, |ref| max {scale:.3e})"


GRID = list(itertools.product(RANKS, FRACS, ROWS, DTYPES))


@pytest.mark.parametrize("rank,frac,rows,dtype", GRID,
                         ids=[f"r{r}-k{f:.2f}-rows{m}-{str(d).split('.')[-1]}" for r, f, m, d in GRID])
def test_sparse_v_matmul_grid(ext, rank, frac, rows, dtype):
    _skip_unsupported(dtype)
    keep = max(1, round(rank * frac))
    values, mask, _, dense = make_layer(rank, keep, D_OUT, dtype, seed=rank + keep)
    t = torch.randn(rows, rank, device="cuda").to(dtype)
    check(ext.sparse_v_matmul(t, values, mask, rank), t, dense)


@pytest.mark.parametrize("path", [1, 2], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rank,keep,d_out,rows", [(100, 37, 77, 17), (33, 33, 5, 3), (8, 1, 130, 40),
                                                   (1500, 501, 64, 1), (1027, 1027, 129, 65), (4096, 1365, 96, 16)])
def test_both_paths_on_odd_shapes(ext, path, dtype, rank, keep, d_out, rows):
    """Each path forced on shapes that are not multiples of the tiles, words, bytes or vectors."""
    _skip_unsupported(dtype)
    values, mask, _, dense = make_layer(rank, keep, d_out, dtype, seed=7)
    t = torch.randn(rows, rank, device="cuda").to(dtype)
    check(ext.sparse_v_matmul(t, values, mask, rank, None, path), t, dense)


@pytest.mark.parametrize("value_type", [1, 2], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows", [1, 8, 300])
@pytest.mark.parametrize("frac", [0.5, 1.0])
def test_quantized_values(ext, value_type, dtype, rows, frac):
    _skip_unsupported(dtype)
    rank, d_out = 320, 144
    keep = max(1, round(rank * frac))
    values, mask, scales, dense = make_layer(rank, keep, d_out, dtype, value_type=value_type, seed=3)
    t = torch.randn(rows, rank, device="cuda").to(dtype)
    check(ext.sparse_v_matmul(t, values, mask, rank, scales), t, dense)
    with pytest.raises(RuntimeError, match="scales"):
        ext.sparse_v_matmul(t, values, mask, rank)


def test_leading_dims_and_noncontiguous(ext):
    rank, keep, d_out = 256, 100, 96
    values, mask, _, dense = make_layer(rank, keep, d_out, torch.float16)
    t = torch.randn(3, 5, rank * 2, device="cuda", dtype=torch.float16)[..., ::2]  # non-contiguous view
    y = ext.sparse_v_matmul(t, values, mask, rank)
    assert y.shape == (3, 5, d_out)
    check(y.reshape(-1, d_out), t.reshape(-1, rank), dense)
    assert ext.sparse_v_matmul(t[:0], values, mask, rank).shape == (0, 5, d_out)


@pytest.mark.parametrize("path", [1, 2], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("frac", [0.5, 1.0])
def test_one_nonfinite_policy_on_both_paths(ext, path, dtype, frac):
    """inf / nan in t at a basis row a column does not keep never reaches that column; at a kept row it propagates
    as IEEE arithmetic says. Same answer on the decode kernel and on the prefill GEMM (which recomputes the rows
    holding inf / nan with the decode kernel)."""
    _skip_unsupported(dtype)
    rank, d_out, rows = 96, 70, 40
    keep = max(1, round(rank * frac))
    values, mask, _, dense = make_layer(rank, keep, d_out, dtype, seed=11)
    t = torch.randn(rows, rank, device="cuda").to(dtype)
    t[0, 5] = float("inf")
    t[7, 40] = float("-inf")
    t[7, 41] = float("inf")
    t[20, 60] = float("nan")
    t[39, :] = float("inf")
    got = ext.sparse_v_matmul(t, values, mask, rank, None, path).double()
    kept = unpack_bits(mask.cpu(), rank).t().to("cuda")  # [rank, d_out]: row i kept by column j
    td = t.double()
    # Reference that sums only kept rows (the product with an unkept zero is skipped, not inf * 0).
    terms = td[:, :, None] * dense[None, :, :]
    ref = torch.where(kept[None], terms, torch.zeros((), dtype=torch.float64, device="cuda")).sum(dim=1)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref)) and torch.equal(torch.isneginf(got), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    if frac < 1.0:
        assert finite[0].any() and (~finite[0]).any(), "row 0 must have columns that keep row 5 and ones that do not"
    rtol, atol = TOL[dtype]
    scale = ref[finite].abs().max().item()
    assert ((got - ref).abs()[finite] <= rtol * ref.abs()[finite] + atol * scale).all()


def test_argument_errors(ext):
    values, mask, _, _ = make_layer(64, 32, 16, torch.float16)
    t = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="rank"):
        ext.sparse_v_matmul(t, values, mask, 65)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.sparse_v_matmul(t.float(), values, mask, 64)
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.sparse_v_matmul(t.cpu(), values, mask, 64)
    with pytest.raises(RuntimeError, match="mask"):
        ext.sparse_v_matmul(t, values, mask[:, :4], 64)


def test_kernels_module_and_rocket_linear_on_cuda(ext):
    from rocket_deploy.rocket_linear import RocketLinear
    from rocket_deploy.runtime import kernels
    assert kernels.available() and kernels.why_unavailable() is None
    torch.manual_seed(0)
    d_in, d_out, rank, keep = 192, 320, 96, 40
    u = torch.randn(d_in, rank) / d_in ** 0.5
    v = torch.randn(rank, d_out)
    keep_mask = torch.zeros(rank, d_out, dtype=torch.bool)
    keep_mask.scatter_(0, torch.rand(rank, d_out).topk(keep, dim=0).indices, True)
    for dtype in (torch.float32, torch.float16):
        lin = RocketLinear.from_factors(u, v * keep_mask, keep_mask, bias=torch.randn(d_out), dtype=dtype).cuda()
        w = lin.dense_weight().double()
        for rows in (1, 7, 100):
            x = torch.randn(rows, d_in, device="cuda").to(dtype)
            t = (x @ lin.u).double()  # the U product is torch's; the reference starts from the same t
            ref = t @ lin.dense_v().double() + lin.bias.double()
            got = lin(x)
            rtol, atol = TOL[dtype]
            err = (got.double() - ref).abs().max().item()
            assert err <= (atol + rtol) * ref.abs().max().item(), err
            dense_ref = x.double() @ w + lin.bias.double()
            assert (got.double() - dense_ref).abs().max().item() <= 2e-2 * dense_ref.abs().max().item()
