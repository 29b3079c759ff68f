"""Post-ROCKET quantization: quantizer math, byte accounting, quantized profile / knapsack, artifact, CLI."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import rocket_deploy as rd
from rocket_deploy.artifact import read_manifest
from rocket_deploy.compress.allocate import _dense_option, allocate, budget_bytes
from rocket_deploy.compress.candidates import fit_rank
from rocket_deploy.compress.factorize import eigenbasis, factorize
from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
from rocket_deploy.compress.quantize import (
    INT8_MAX, dequant_int4, dequant_matrix, error_stats, factor_error_stats, gram_of, matrix_bytes,
    pack_nibbles, quant_dense_bytes, quant_factor_bytes, quantize_cols, quantize_dense, quantize_factors,
    quantize_int4, unpack_nibbles)
from rocket_deploy.config import CalibrationConfig, ConfigError, RocketConfig
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
from rocket_deploy.sparse_format import dense_weight_bytes, factor_bytes
from rocket_deploy.testing import tiny_llama

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4, sources=("stdlib",))


def _whitening(k: int, seed: int = 0) -> torch.Tensor:
    """Upper S with S^T S = Gram of correlated activations with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g, dtype=torch.float64) @ (torch.eye(k, dtype=torch.float64)
                                                                  + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64))
    x[:, :3] *= 20
    return torch.linalg.cholesky(x.t() @ x / x.shape[0]).t().contiguous()


def _heavy(k: int, n: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((k, n)).to(torch.float64) * 0.02


# ------------------------------------------------------------------------------------------------ quantizers
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_per_column_round_trip_and_bounds(fmt):
    torch.manual_seed(0)
    m = torch.randn(96, 40, dtype=torch.float64) * torch.logspace(-3, 1, 40, dtype=torch.float64)
    q, scales, deq = quantize_cols(m, fmt, None, ratios=(1.0,))
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn) and scales.dtype == torch.float32
    assert torch.equal(dequant_matrix(fmt, q, scales, None, 96, torch.float64), deq)
    err = (deq - m).abs()
    if fmt == "int8":
        assert int(q.to(torch.int16).abs().max()) <= INT8_MAX
        assert bool((err <= scales.double()[None, :] / 2 * (1 + 1e-6)).all())       # half a step, no clipping at 1.0
    else:                                       # e4m3: 3 mantissa bits -> relative error <= 2^-4 (normal range)
        bound = torch.maximum(m.abs() * 2.0 ** -4, scales.double()[None, :] * 2.0 ** -10)
        assert bool((err <= bound * (1 + 1e-6)).all())
    assert float((err.pow(2).sum() / m.pow(2).sum()).sqrt()) < (0.01 if fmt == "int8" else 0.04)


def test_int4_packing_and_layout():
    codes = torch.randint(0, 16, (5, 3, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 3, 32) and torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | (int(codes[0, 0, 1]) << 4)     # low nibble first
    torch.manual_seed(0)
    m = torch.randn(200, 24, dtype=torch.float64)        # K = 200: last group of 64 padded to 128
    packed, scales, zeros, deq = quantize_int4(m, 128, None, ratios=(1.0,))
    assert packed.shape == (24, 2, 64) and packed.dtype == torch.uint8
    assert scales.shape == (24, 2) and scales.dtype == torch.float16
    assert zeros.shape == (24, 1) and zeros.dtype == torch.uint8
    assert torch.equal(dequant_int4(packed, scales, zeros, 200, torch.float64), deq)
    step = scales.double().repeat_interleave(128, dim=1)[:, :200].t()
    assert bool(((deq - m).abs() <= step / 2 * (1 + 1e-6)).all())          # asymmetric, no clipping at 1.0
    zp = unpack_nibbles(zeros)[:, :2]
    assert int(zp.max()) <= 15 and int(unpack_nibbles(packed).max()) <= 15
    assert matrix_bytes(200, 24, "int4", 128) == packed.numel() + 2 * scales.numel() + zeros.numel()


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_scale_search_beats_max_on_whitened_metric(fmt):
    s = _whitening(128)
    h = gram_of(s)
    m = _heavy(128, 64)

    def werr(deq):
        return float((s @ (deq - m)).pow(2).sum())
    if fmt == "int4":
        searched = quantize_int4(m, 32, h)[3]
        plain = quantize_int4(m, 32, h, ratios=(1.0,))[3]
    else:
        searched = quantize_cols(m, fmt, h)[2]
        plain = quantize_cols(m, fmt, h, ratios=(1.0,))[2]
    assert werr(searched) < 0.97 * werr(plain)
    if fmt != "int4":           # exact per-column metric: never worse than max scaling in any column
        col = lambda d: (s @ (d - m)).pow(2).sum(0)
        assert bool((col(searched) <= col(plain) * (1 + 1e-9)).all())


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4"])
def test_quantized_factors_error_and_search(scheme):
    s = _whitening(128, 3)
    torch.manual_seed(4)
    w = torch.randn(128, 96, dtype=torch.float64) / 10
    eb = eigenbasis(w, s)
    f = factorize(eb, 64, 32)
    qf = quantize_factors(f.u, f.v, f.keep_mask, s, scheme, group=64)
    qmax = quantize_factors(f.u, f.v, f.keep_mask, s, scheme, group=64, ratios=(1.0,))
    st, st_max = factor_error_stats(w, qf, s), factor_error_stats(w, qmax, s)
    assert st.whitened_sq >= f.whitened_sq * (1 - 1e-9)         # quantization adds error ...
    assert st.whitened_sq < st_max.whitened_sq                  # ... less with the whitened clip search
    direct = error_stats(w, qf.u_deq @ qf.v_deq, s)
    assert direct.whitened_sq == pytest.approx(st.whitened_sq, rel=1e-9)
    assert bool((qf.v_deq[~f.keep_mask] == 0).all())
    assert qf.v_values.shape == (96, 32) and qf.v_mask.shape == (96, 8)
    # the stored codes reproduce the dequantized factors
    mod = QuantRocketLinear.from_quantized(qf, 128, 96)
    assert torch.allclose(mod.dense_u(torch.float64), qf.u_deq, rtol=0, atol=1e-12)
    assert torch.allclose(mod.dense_v(torch.float64), qf.v_deq, rtol=0, atol=1e-12)
    rel = {"int8": 0.02, "fp8": 0.08, "int4": 0.3}[scheme]
    assert (st.whitened_sq - f.whitened_sq) < rel ** 2 * float((s @ w).pow(2).sum())


def test_int4s_v_values_round_trip_bounds_and_cost():
    """quant_v_bits=4: V's kept values as symmetric 4-bit codes (nibbles, odd keep padded), half a step of error at
    clip ratio 1, more whitened error than int8 V but far less than the factorization's own at these sizes."""
    from rocket_deploy.quant_format import pack_v_int4s, unpack_v_int4s
    codes = torch.randint(-7, 8, (5, 7), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_v_int4s(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(unpack_v_int4s(packed, 7), codes)
    with pytest.raises(ValueError, match="-7..7"):
        pack_v_int4s(torch.tensor([[8]], dtype=torch.int8))
    m = torch.randn(40, 30, dtype=torch.float64)
    q, scales, deq = quantize_cols(m, "int4s", None, ratios=(1.0,))
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7
    assert bool(((deq - m).abs() <= scales.double()[None, :] / 2 * (1 + 1e-6)).all())
    s = _whitening(128, 3)
    torch.manual_seed(4)
    w = torch.randn(128, 96, dtype=torch.float64) / 10
    f = factorize(eigenbasis(w, s), 64, 31)                            # odd keep
    q8 = quantize_factors(f.u, f.v, f.keep_mask, s, "int4", group=64)
    q4 = quantize_factors(f.u, f.v, f.keep_mask, s, "int4", group=64, v_bits=4)
    assert q4.v_values.dtype == torch.uint8 and q4.v_values.shape == (96, 16) and torch.equal(q4.v_mask, q8.v_mask)
    e8, e4 = factor_error_stats(w, q8, s).whitened_sq, factor_error_stats(w, q4, s).whitened_sq
    assert f.whitened_sq < e8 < e4 < 2 * e8, (f.whitened_sq, e8, e4)
    mod = QuantRocketLinear.from_quantized(q4, 128, 96)
    assert mod.v_fmt == "int4s" and mod.v_values.shape == (96, 16)
    assert torch.allclose(mod.dense_v(torch.float64), q4.v_deq, rtol=0, atol=1e-12)
    assert q4.bytes(128, 96) == q8.bytes(128, 96) - 96 * (31 - 16)     # half a byte per value (odd keep rounds up)
    with pytest.raises(ValueError, match="int4"):
        quantize_factors(f.u, f.v, f.keep_mask, s, "int8", v_bits=4)


def test_bytes_include_scales_and_match_storage():
    assert quant_factor_bytes(576, 1536, 192, 96, "int8") == 576 * 192 + 4 * 192 + 1536 * (24 + 96) + 4 * 1536
    assert quant_factor_bytes(576, 1536, 192, 192, "fp8") == 576 * 192 + 4 * 192 + 192 * 1536 + 4 * 1536
    # int4: 576 = 4.5 groups -> 5 groups of 64 bytes per column, fp16 scales, packed zero points; V int8
    assert quant_factor_bytes(576, 1536, 192, 96, "int4") == 192 * (5 * 64 + 5 * 2 + 3) + 1536 * (24 + 96 + 4)
    assert quant_dense_bytes(576, 1536, "int8") == 576 * 1536 + 4 * 1536
    assert quant_dense_bytes(576, 1536, "int4") == 1536 * (5 * 64 + 5 * 2 + 3)
    assert quant_factor_bytes(576, 576, 256, 128, "int8") < factor_bytes(576, 576, 256, 128) / 1.85   # the bitmask does not shrink
    for scheme in ("int8", "fp8", "int4"):
        for keep in (24, 48):
            mod = QuantRocketLinear(100, 72, 48, keep, scheme, group=32)
            stored = sum(getattr(mod, n).numel() * getattr(mod, n).element_size()
                         for n in ("u_q", "u_scales", "u_zeros", "v_values", "v_scales", "v_mask")
                         if getattr(mod, n) is not None and not (n == "v_mask" and keep == 48))
            assert stored == quant_factor_bytes(100, 72, 48, keep, scheme, 32), (scheme, keep)
    for keep in (23, 24, 48):                                             # int4s V values: nibbles
        mod = QuantRocketLinear(100, 72, 48, keep, "int4", group=32, v_fmt="int4s")
        stored = sum(getattr(mod, n).numel() * getattr(mod, n).element_size()
                     for n in ("u_q", "u_scales", "u_zeros", "v_values", "v_scales", "v_mask")
                     if getattr(mod, n) is not None and not (n == "v_mask" and keep == 48))
        assert stored == quant_factor_bytes(100, 72, 48, keep, "int4", 32, v_bits=4), keep
        d = QuantDenseLinear(100, 72, scheme, group=32)
        stored = sum(t.numel() * t.element_size() for t in (d.w_q, d.w_scales, d.w_zeros) if t is not None)
        assert stored == quant_dense_bytes(100, 72, scheme, 32)


def test_config_validation():
    with pytest.raises(ConfigError, match="quantize"):
        RocketConfig(quantize="int3")
    with pytest.raises(ConfigError, match="dense-quant"):
        RocketConfig(method="dense-quant")
    with pytest.raises(ConfigError, match="quant_group_size"):
        RocketConfig(quantize="int4", quant_group_size=7)
    assert RocketConfig.from_dict(RocketConfig(quantize="fp8").to_dict()).quantize == "fp8"
    with pytest.raises(ConfigError, match="quant_v_bits=4 stores"):
        RocketConfig(quantize="int8", quant_v_bits=4)
    with pytest.raises(ConfigError, match="quant_v_bits must be 8 or 4"):
        RocketConfig(quantize="int4", quant_v_bits=2)
    assert RocketConfig(quantize="int4").quant_v_bits == 4 and RocketConfig(quantize="int8").quant_v_bits == 8
    assert RocketConfig().replace(quantize="int4").quant_v_bits == 4                 # re-derived for the scheme
    saved = {k: v for k, v in RocketConfig(quantize="int4").to_dict().items() if k != "quant_v_bits"}
    assert RocketConfig.from_dict(saved).quant_v_bits == 8       # saved before the option existed: V was int8


# ------------------------------------------------------------------------------------- profile and knapsack
@pytest.fixture(scope="module")
def setup(tiny_tok):
    model = tiny_llama()
    data = prepare_calibration(tiny_tok, CAL, model)
    profs = {q: run_profile(model, tiny_tok, RocketConfig(quantize=q), CAL, data=data, progress=False)
             for q in (None, "int8", "int4")}
    profs["int4-v8"] = run_profile(model, tiny_tok, RocketConfig(quantize="int4", quant_v_bits=8), CAL, data=data,
                                   progress=False)
    return model, data, profs


def test_knapsack_sees_quantized_options(setup):
    model, data, profs = setup
    p16, p8 = profs[None], profs["int8"]
    assert p8.grid["quantize"] == "int8" and "quantize" not in p16.grid
    for name, lp in p8.layers.items():
        assert lp.dense_option is not None and lp.dense_option.dense
        assert lp.dense_option.bytes == quant_dense_bytes(lp.d_in, lp.d_out, "int8")
        assert lp.dense_option.whitened_sq > 0                      # the quantized dense weight has error
        assert _dense_option(lp) is lp.dense_option
        for o in lp.options:
            assert o.bytes == quant_factor_bytes(lp.d_in, lp.d_out, o.rank, o.keep, "int8")
            assert o.bytes < lp.dense_option.bytes
        assert p16.layers[name].dense_option is None
        # at equal bytes the quantized options have larger ranks than fp16 factors could
        big = max(lp.options, key=lambda o: o.bytes)
        fp16_fit = fit_rank(lp.d_in, lp.d_out, big.bytes, big.keep / big.rank, 8)
        assert fp16_fit is None or fp16_fit[0] < big.rank
        # the grid spans fractions of the *quantized* dense bytes
        assert big.bytes > 0.6 * lp.dense_option.bytes and min(o.bytes for o in lp.options) < 0.5 * lp.dense_option.bytes
    # quantized options carry (slightly) more error than the same (rank, keep) unquantized: in total, and never
    # much less for one (the sparse refit is not exactly optimal, so quantization noise may help by a hair)
    pairs = []
    for name, lp in p8.layers.items():
        common = {(o.rank, o.keep): o for o in p16.layers[name].options}
        pairs += [(o, common[(o.rank, o.keep)]) for o in lp.options if (o.rank, o.keep) in common]
    assert len(pairs) > 20 and all(a.whitened_sq >= b.whitened_sq * 0.999 for a, b in pairs)
    assert sum(a.whitened_sq - b.whitened_sq for a, b in pairs) > 0
    cfg = RocketConfig(budget=0.55, quantize="int8")
    alloc = allocate(p8, cfg)
    assert alloc.total_bytes <= budget_bytes(p8, 0.55)
    used = sum(lp.dense_option.bytes if alloc.choice[n] is None else alloc.choice[n].bytes for n, lp in p8.layers.items())
    assert used == alloc.total_bytes


def test_profile_round_trip_keeps_dense_option(setup):
    from rocket_deploy.compress.profile import Profile
    _, _, profs = setup
    p = Profile.load(profs["int4"].cache_dir)
    lp = next(iter(p.layers.values()))
    assert lp.dense_option == next(iter(profs["int4"].layers.values())).dense_option


def test_profile_mismatch_is_refused(setup, tiny_tok):
    model, data, profs = setup
    with pytest.raises(ValueError, match="quantize"):
        compress(model, tiny_tok, RocketConfig(budget=0.5, quantize="fp8"), CAL, data=data, profile=profs["int8"],
                 progress=False)


# ------------------------------------------------------------------------------------------------- artifact
@pytest.mark.parametrize("scheme,budget,v_bits", [("int8", 0.55, 8), ("int4", 0.75, 8), ("int4", 0.75, 4)])
def test_quantized_artifact_round_trip_bit_exact(setup, tiny_tok, tmp_path, scheme, budget, v_bits):
    model, data, profs = setup
    cfg = RocketConfig(budget=budget, quantize=scheme, safeguard=False, cap_alphas=(), quant_v_bits=v_bits)
    prof = profs["int4-v8" if (scheme, v_bits) == ("int4", 8) else scheme]
    res = compress(model, tiny_tok, cfg, CAL, data=data, profile=prof, progress=False, out=str(tmp_path / "q"))
    m = read_manifest(res.path)
    assert m["format_version"] == 2 and m["config"]["quantize"] == scheme
    assert m["budget"]["compressed_bytes"] <= (1 - budget) * m["budget"]["dense_bytes"]
    kinds = {r["kind"] for r in m["layers"].values()}
    assert "rocket" in kinds
    for r in m["layers"].values():
        assert r["quant"]["scheme"] == scheme and r["whitened_sq"] > 0
    f = load_file(os.path.join(res.path, "factors.safetensors"))
    live = res.model.state_dict()
    for k, t in f.items():
        assert t.dtype == live[k].dtype and torch.equal(t, live[k]), k
    name, rec = next((n, r) for n, r in m["layers"].items() if r["kind"] == "rocket")
    assert f[f"{name}.u_q"].dtype == (torch.uint8 if scheme == "int4" else torch.int8)
    assert f[f"{name}.v_values"].dtype == (torch.int8 if v_bits == 8 else torch.uint8)
    assert rec["quant"]["v"] == ("int4s" if v_bits == 4 else "int8")
    if v_bits == 4:
        assert tuple(f[f"{name}.v_values"].shape) == (rec["d_out"], (rec["keep"] + 1) // 2)
        with pytest.raises(ValueError, match="quant_v_bits"):      # a v8 profile cannot serve a v4 compress
            compress(model, tiny_tok, cfg, CAL, data=data, profile=profs["int4-v8"], progress=False)
    stored = sum(f[f"{name}.{b}"].numel() * f[f"{name}.{b}"].element_size()
                 for b in ("u_q", "u_scales", "u_zeros", "v_values", "v_scales", "v_mask") if f"{name}.{b}" in f)
    assert stored == rec["bytes"]
    loaded, _, _ = rd.load_artifact(res.path)
    x = data.heldout.ids[:2]
    assert torch.equal(loaded(x).logits, res.model(x).logits)
    assert any(isinstance(mm, QuantRocketLinear) for mm in loaded.modules())
    before = {k: v.clone() for k, v in loaded.state_dict().items() if k in f}
    loaded.half().float()                               # dtype casts never touch the quantized codes or scales
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_fp8_and_dense_quant_artifacts(setup, tiny_tok, tmp_path):
    model, data, profs = setup
    from rocket_deploy.perplexity import perplexity
    res = compress(model, tiny_tok, RocketConfig(method="dense-quant", quantize="fp8"), CAL, data=data,
                   profile=profs[None], progress=False, out=str(tmp_path / "dq"))
    m = read_manifest(res.path)
    assert all(r["kind"] == "dense" and r["quant"]["w"] == "fp8" for r in m["layers"].values())
    assert m["budget"]["compressed_bytes"] == sum(quant_dense_bytes(r["d_in"], r["d_out"], "fp8")
                                                  for r in m["layers"].values())
    f = load_file(os.path.join(res.path, "factors.safetensors"))
    assert any(t.dtype == torch.float8_e4m3fn for t in f.values())
    loaded = rd.load(res.path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantDenseLinear)
    x = data.heldout.ids[:2]
    assert torch.equal(loaded(x).logits, res.model(x).logits)
    ppl_q, ppl_d = perplexity(loaded, data.heldout.ids), perplexity(model, data.heldout.ids)
    assert abs(ppl_q / ppl_d - 1) < 0.05


def test_unquantized_artifacts_stay_version_1(setup, tiny_tok, tmp_path):
    model, data, profs = setup
    res = compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=profs[None], progress=False,
                   out=str(tmp_path / "v1"))
    m = read_manifest(res.path)
    assert m["format_version"] == 1 and all("quant" not in r for r in m["layers"].values())
    assert load_file(os.path.join(res.path, "factors.safetensors"))  # fp16 factors as before
    assert isinstance(rd.load(res.path), torch.nn.Module)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_quantize(tiny_llama_dir, tmp_path):
    from rocket_deploy.cli import main
    fast = ["--calib", "stdlib", "--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet"]
    out = str(tmp_path / "q8")
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", "0.6", "--quantize", "int8", "--out", out,
                                  *fast], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["quantize"] == "int8" and summary["removed_bytes_fraction"] >= 0.6 - 1e-9
    m = json.load(open(os.path.join(out, "rocket.json")))
    assert m["format_version"] == 2 and all(rec["quant"]["scheme"] == "int8" for rec in m["layers"].values())
    assert isinstance(rd.load(out), torch.nn.Module)
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--method", "dense-quant", "--out",
                                  str(tmp_path / "bad"), *fast])
    assert r.exit_code == 1 and "dense-quant" in r.output and "Traceback" not in r.output
    assert not os.path.exists(tmp_path / "bad")
    # the baseline itself: every targeted layer kept dense and quantized, from the CLI
    out = str(tmp_path / "dq4")
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--method", "dense-quant", "--quantize", "int4",
                                  "--out", out, *fast], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["method"] == "dense-quant" and summary["layers_compressed"] == 0 and summary["layers_dense"] > 0
    m = json.load(open(os.path.join(out, "rocket.json")))
    assert all(rec["quant"]["scheme"] == "int4" for rec in m["layers"].values())
    assert isinstance(rd.load(out), torch.nn.Module)


def test_allocation_when_quantized_dense_option_is_dominated(tmp_path):
    """A quantized dense option has error > 0 and may be Pareto-dominated by a factorized one; the per-layer cap
    must still leave every layer an option (the lowest-error one)."""
    from rocket_deploy.compress.profile import LayerOption, LayerProfile, Profile

    def lp(name, errs, dense_err):
        opts = [LayerOption(8, 8, b, 1, e, e, e) for b, e in zip((80, 40), errs)]
        return LayerProfile(name, 10, 10, False, 200, name, 0.0, 1.0, opts, LayerOption(0, 0, 100, 100, dense_err,
                                                                                          dense_err, dense_err))
    prof = Profile({"a": lp("a", (0.9, 0.95), 1.0), "b": lp("b", (0.001, 0.002), 0.0005)}, str(tmp_path), {}, {})
    alloc = allocate(prof, RocketConfig(budget=0.5, quantize="int8", objective="rel-original"))
    assert alloc.choice["a"] is not None and alloc.choice["a"].rel_original == 0.9
    assert alloc.total_bytes <= 200
