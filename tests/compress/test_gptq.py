"""GPTQ (compress/gptq.py) against a float64 reference, against round-to-nearest, and V refit on U_q."""
import math

import pytest
import torch

from rocket_deploy.compress.gptq import GPTQ_DAMP, gptq_quantize, quantize_matrix_method
from rocket_deploy.compress.quant_refit import refit_v_on_support
from rocket_deploy.compress.quantize import (_int4_deq, dequant_matrix, int4_diag_blocks, int4_search,
                                             quantize_cols, quantize_factors, quantize_matrix)


def _problem(k: int, n: int, seed: int):
    """Correlated activations with outlier channels (Gram per token) and a heavy-tailed weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g, dtype=torch.float64) @ (
        torch.eye(k, dtype=torch.float64) + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64))
    x[:, :3] *= 20
    h = x.t() @ x / x.shape[0]
    m = torch.distributions.StudentT(4.0).sample((k, n)).to(torch.float64) * 0.02
    return m, h


def _werr(d: torch.Tensor, h: torch.Tensor) -> float:
    return float(((h @ d) * d).sum())


def _reference(m: torch.Tensor, h: torch.Tensor, fmt: str, group: int) -> torch.Tensor:
    """Unblocked GPTQ in float64 with the explicit OBS update: after row k, the remaining rows move by
    ``-Hinv[j, k] / Hinv[k, k] * err`` and ``Hinv`` drops row/column k (rank-1 downdate)."""
    k, n = m.shape
    hd = h + GPTQ_DAMP * float(torch.diagonal(h).mean()) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.inv(hd)
    w = m.clone()
    out = torch.zeros_like(m)
    if fmt != "int4":
        scale = quantize_cols(m, fmt, h)[1].double()
    for r in range(k):
        if fmt == "int4":
            if r % group == 0:
                rows = w[r:r + group]
                x = torch.cat([rows, rows.new_zeros(group - rows.shape[0], n)])[None]
                sc, ze = int4_search(x, int4_diag_blocks(h[r:r + group, r:r + group], rows.shape[0], group))
            q = _int4_deq(w[r], sc[0], ze[0])[1]
        else:
            q = torch.round(w[r] / scale).clamp(-127, 127) * scale
        out[r] = q
        e = w[r] - q
        w[r + 1:] -= (hinv[r + 1:, r] / hinv[r, r])[:, None] * e[None, :]
        hinv = hinv - hinv[:, r:r + 1] @ hinv[r:r + 1, :] / hinv[r, r]
    return out


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", 128)])
def test_matches_float64_reference(fmt, group):
    m, h = _problem(96, 24, 0)
    got = gptq_quantize(m, h, fmt, group)
    ref = _reference(m, h, fmt, group)
    same = (got.deq - ref).abs() <= 1e-9 * m.abs().max()
    assert float(same.double().mean()) > 0.995          # float summation order may flip a rounding tie or two
    assert _werr(got.deq - m, h) == pytest.approx(_werr(ref - m, h), rel=2e-3)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_beats_rtn_with_clip_search(fmt, act_order, seed):
    m, h = _problem(192, 64, seed)
    rtn = quantize_matrix(m, fmt, h, 64)
    g = gptq_quantize(m, h, fmt, 64, act_order=act_order)
    assert _werr(g.deq - m, h) < 0.8 * _werr(rtn.deq - m, h)
    # what is stored is what was evaluated
    assert torch.equal(dequant_matrix(fmt, g.q, g.scales, g.zeros, 192, torch.float64), g.deq)
    assert g.bytes == rtn.bytes and g.q.shape == rtn.q.shape and g.q.dtype == rtn.q.dtype


def test_float32_and_padding_and_dead_inputs():
    m, h = _problem(100, 16, 4)                 # 100 rows: last int4 group of 64 holds 36 rows (padded)
    h[5, :] = 0
    h[:, 5] = 0                                 # an input never active
    g = gptq_quantize(m.float(), h.float(), "int4", 64)
    assert g.deq.dtype == torch.float32 and torch.isfinite(g.deq).all()
    assert torch.equal(dequant_matrix("int4", g.q, g.scales, g.zeros, 100, torch.float32), g.deq)
    assert _werr(g.deq.double() - m, h) < _werr(quantize_matrix(m, "int4", h, 64).deq - m, h)


def test_bad_input():
    m, h = _problem(32, 8, 5)
    with pytest.raises(ValueError, match="32 x 32"):
        gptq_quantize(m, h[:16, :16], "int4", 16)
    with pytest.raises(ValueError, match="int8 / fp8 / int4"):
        gptq_quantize(m, h, "int2", 16)
    with pytest.raises(ValueError, match="'rtn' or 'gptq'"):
        quantize_matrix_method(m, "int4", h, 16, method="awq")
    with pytest.raises(ValueError, match="full calibration Gram"):
        quantize_matrix_method(m, "int4", torch.diagonal(h), 16, method="gptq")


# -------------------------------------------------------------------------------------------------- V refit
def test_refit_v_solves_least_squares_on_support():
    torch.manual_seed(0)
    a = torch.randn(40, 12, dtype=torch.float64)
    z = torch.randn(40, 9, dtype=torch.float64)
    mask = torch.zeros(12, 9, dtype=torch.bool)
    for j in range(9):
        mask[torch.randperm(12)[:5], j] = True
    v = refit_v_on_support(a, z, mask, ridge_rel=0.0)
    assert bool((v[~mask] == 0).all())
    for j in range(9):
        idx = mask[:, j].nonzero()[:, 0]
        sol = torch.linalg.lstsq(a[:, idx], z[:, j:j + 1]).solution[:, 0]
        assert torch.allclose(v[idx, j], sol, atol=1e-10)
    full = refit_v_on_support(a, z, torch.ones(12, 9, dtype=torch.bool), ridge_rel=0.0)
    assert torch.allclose(full, torch.linalg.lstsq(a, z).solution, atol=1e-10)


def test_factor_aware_quantization_reduces_error():
    """GPTQ on U with the layer's input Gram + V refit to U_q: lower exact whitened error than RTN on U."""
    from rocket_deploy.compress.factorize import eigenbasis, factorize
    m, h = _problem(128, 96, 6)
    s = torch.linalg.cholesky(h).t().contiguous()
    eb = eigenbasis(m, s)
    f = factorize(eb, 48, 24)
    errs = {}
    for u_method, refit in (("rtn", False), ("gptq", False), ("gptq", True)):
        qf = quantize_factors(f.u, f.v, f.keep_mask, s, "int4", 32, u_method=u_method, v_refit=refit)
        assert bool((qf.v_deq[~f.keep_mask] == 0).all())                         # support unchanged
        errs[(u_method, refit)] = float((eb.z - s @ qf.u_deq @ qf.v_deq).pow(2).sum())
    assert errs[("gptq", False)] < errs[("rtn", False)]
    assert errs[("gptq", True)] < errs[("gptq", False)]


# ------------------------------------------------------------------------------------------- config + pipeline
def test_config_fields_validated_and_saved():
    from rocket_deploy.config import ConfigError, RocketConfig
    c = RocketConfig(quantize="int4", quant_method="gptq", quant_u_method="gptq", quant_v_refit=True)
    assert RocketConfig.from_dict(c.to_dict()) == c
    old = c.to_dict()
    for k in ("quant_method", "quant_act_order", "quant_u_method", "quant_v_refit"):
        old.pop(k)
    back = RocketConfig.from_dict(old)              # a config saved before these fields: what was done then (RTN)
    assert (back.quant_method, back.quant_u_method, back.quant_v_refit) == ("rtn", "rtn", False)
    assert RocketConfig().quant_method == "gptq" and RocketConfig().quant_v_refit
    with pytest.raises(ConfigError, match="quant_method must be one of"):
        RocketConfig(quant_method="awq")
    with pytest.raises(ConfigError, match="quant_v_refit must be true or false"):
        RocketConfig(quant_v_refit="yes")


@pytest.fixture(scope="module")
def tiny_setup():
    from rocket_deploy.compress.pipeline import prepare_calibration
    from rocket_deploy.config import CalibrationConfig
    from rocket_deploy.testing import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_llama()
    cal = CalibrationConfig(samples=8, seq_len=32, eval_samples=4, sources=("stdlib",))
    return model, tok, cal, prepare_calibration(tok, cal, model)


def test_dense_quant_gptq_artifact(tiny_setup, tmp_path):
    import rocket_deploy as rd
    from rocket_deploy.compress.pipeline import compress, run_profile
    from rocket_deploy.config import RocketConfig
    model, tok, cal, data = tiny_setup
    prof = run_profile(model, tok, RocketConfig(quantize="int4", quant_group_size=32, quant_act_order=False), cal,
                       data=data, progress=False)
    res = {}
    for qm in ("rtn", "gptq"):
        cfg = RocketConfig(method="dense-quant", quantize="int4", quant_group_size=32, quant_method=qm,
                           quant_act_order=False)
        res[qm] = compress(model, tok, cfg, cal, data=data, profile=prof, progress=False, out=str(tmp_path / qm))
    g, r = res["gptq"].manifest, res["rtn"].manifest
    assert g["budget"]["compressed_bytes"] == r["budget"]["compressed_bytes"]
    assert g["config"]["quant_method"] == "gptq"
    tot = lambda m, k: sum(rec[k] ** 2 for rec in m["layers"].values())
    assert tot(g, "rel_whitened") < tot(r, "rel_whitened")
    assert all(rec["quant"]["method"] == "gptq" and rec["rel_whitened"] <= rec["rel_whitened_rtn"] * 1.01
               for rec in g["layers"].values())
    loaded = rd.load(str(tmp_path / "gptq"))
    x = data.heldout.ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, res["gptq"].model(input_ids=x).logits)


def test_rocket_int4_factor_aware_lowers_layer_errors(tiny_setup):
    from rocket_deploy.compress.pipeline import compress, run_profile
    from rocket_deploy.config import RocketConfig
    model, tok, cal, data = tiny_setup
    base = RocketConfig(budget=0.8, quantize="int4", quant_group_size=32, quant_method="gptq", safeguard=False,
                        quant_act_order=False, quant_u_method="rtn", quant_v_refit=False)
    prof = run_profile(model, tok, base, cal, data=data, progress=False)
    on = compress(model, tok, base.replace(quant_u_method="gptq", quant_v_refit=True), cal, data=data, profile=prof,
                  progress=False).manifest
    off = compress(model, tok, base, cal, data=data, profile=prof, progress=False).manifest
    assert on["budget"]["compressed_bytes"] == off["budget"]["compressed_bytes"]      # same allocation
    rocket = [n for n, rec in on["layers"].items() if rec["kind"] == "rocket"]
    assert rocket
    for n in rocket:
        assert on["layers"][n]["rel_whitened"] <= on["layers"][n]["rel_whitened_rtn"] * (1 + 1e-6)
        assert on["layers"][n]["rel_whitened_rtn"] == pytest.approx(off["layers"][n]["rel_whitened"], rel=1e-9)


@pytest.mark.parametrize("d_in,r,d_out,keep,cond", [(40, 12, 9, 5, 1.0), (64, 32, 50, 7, 1e3), (30, 16, 33, 15, 1e7),
                                                     (16, 16, 8, 1, 1.0), (20, 24, 10, 12, 1.0),
                                                     (48, 24, 40, 12, -1e-7)])
def test_iterative_v_refit_matches_the_direct_solve(d_in, r, d_out, keep, cond):
    """The CG solve (warm-started or not) equals the batched-Cholesky solve to rounding, also on ill-conditioned
    or nearly collinear dictionaries (CG stalls: those columns fall back to the direct solve, as after 1 iteration)."""
    g = torch.Generator().manual_seed(d_in + r)
    scale = torch.logspace(0, math.log10(cond) if cond > 0 else 0, r, dtype=torch.float64)
    a = torch.randn(d_in, r, generator=g, dtype=torch.float64) * scale
    if cond < 0:            # nearly collinear columns: CG stalls, those columns are solved directly
        a[:, 1::2] = a[:, ::2][:, :a[:, 1::2].shape[1]] + (-cond) * torch.randn(d_in, r // 2, generator=g,
                                                                                dtype=torch.float64)
    z = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    mask = torch.zeros(r, d_out, dtype=torch.bool)
    for j in range(d_out):
        mask[torch.randperm(r, generator=g)[:keep], j] = True
    direct = refit_v_on_support(a, z, mask, max_iters=0)
    for v0, iters in ((None, 60), (torch.randn(r, d_out, generator=g, dtype=torch.float64), 60), (None, 1)):
        it = refit_v_on_support(a, z, mask, v0=v0, max_iters=iters)
        assert bool((it[~mask] == 0).all())
        err = lambda v: float((z - a @ v).pow(2).sum())
        assert abs(err(it) - err(direct)) <= 1e-9 * err(direct)
        assert torch.allclose(it, direct, rtol=1e-5, atol=1e-7 * float(direct.abs().max()))
