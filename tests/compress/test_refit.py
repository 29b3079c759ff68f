"""Refitting both factors (compress/refit.py) and error-propagating materialisation (compress/propagate.py)."""
import pytest
import torch

from rocket_deploy.compress.factorize import eigenbasis, factorize, ridge_refit, select_keep_mask
from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
from rocket_deploy.compress.propagate import propagated_target
from rocket_deploy.compress.refit import alternate_refit, refit_v_on_support
from rocket_deploy.compress.whitening import inverse_upper, whitening_factor
from rocket_deploy.config import CalibrationConfig, ConfigError, RocketConfig
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.testing import tiny_llama

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4)


def _problem(d_in=24, d_out=20, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    w = torch.randn(d_in, d_out, generator=g, dtype=torch.float64)
    s, _ = whitening_factor(x.t() @ x / n)
    return x, w, s


def test_v_refit_is_least_squares_on_support():
    x, w, s = _problem()
    zw = s @ w
    d = torch.randn(24, 8, dtype=torch.float64)
    mask = select_keep_mask(torch.randn(8, 20, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 4)
    v = refit_v_on_support(zw, d, mask, ridge=1e-12)
    assert bool((v[~mask] == 0).all())
    for j in (0, 7, 19):                       # brute force: lstsq on each column's support
        t = mask[:, j].nonzero()[:, 0]
        ref = torch.linalg.lstsq(d[:, t], zw[:, j:j + 1]).solution[:, 0]
        assert torch.allclose(v[t, j], ref, atol=1e-8)


def test_v_refit_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        refit_v_on_support(torch.zeros(5, 4), torch.zeros(5, 3), torch.ones(2, 4, dtype=torch.bool))


def test_alternating_refit_never_worse_and_helps():
    x, w, s = _problem()
    eb = eigenbasis(w, s)
    base = factorize(eb, 12, 5)
    more = factorize(eb, 12, 5, refit_rounds=3)
    assert torch.equal(base.keep_mask, more.keep_mask)
    assert more.whitened_sq < 0.98 * base.whitened_sq
    # whitened error = activation error on the calibration inputs
    assert abs(float((x @ (w - more.u @ more.v)).pow(2).sum() / x.shape[0]) - more.whitened_sq) < 1e-6 * base.whitened_sq
    d0 = ridge_refit(eb.z, eb.coeffs[:12] * base.keep_mask)
    _, _, errs = alternate_refit(eb.z, d0, eb.coeffs[:12] * base.keep_mask, base.keep_mask, 3)
    assert len(errs) == 4 and min(errs) <= errs[0]
    with pytest.raises(ValueError):
        alternate_refit(eb.z, d0, base.v, base.keep_mask, -1)


def test_propagated_target_matches_the_cross_objective():
    x_d, w, _ = _problem(seed=1)
    x_c = x_d + 0.3 * torch.randn_like(x_d)
    n = x_d.shape[0]
    s, s_inv, z, _ = propagated_target(x_c.t() @ x_c / n, x_c.t() @ x_d / n, w)
    w2 = torch.randn_like(w)
    lhs = (x_c @ w2 - x_d @ w).pow(2).sum() / n
    const = (x_d @ w).pow(2).sum() / n - z.pow(2).sum()
    assert torch.allclose(lhs, (s @ w2 - z).pow(2).sum() + const, rtol=1e-9)
    assert const >= -1e-9
    # the exact minimiser is S^-1 Z = least squares of X_d W on X_c
    ref = torch.linalg.lstsq(x_c, x_d @ w).solution
    assert torch.allclose(s_inv @ z, ref, atol=1e-8)
    assert torch.allclose(inverse_upper(s) @ z, s_inv @ z)


def test_config_validates_levers():
    with pytest.raises(ConfigError, match="refit_rounds"):
        RocketConfig(refit_rounds=-1)
    with pytest.raises(ConfigError, match="refit_rounds"):
        RocketConfig(refit_rounds=True)
    with pytest.raises(ConfigError, match="error_propagation"):
        RocketConfig(error_propagation="yes")
    cfg = RocketConfig(refit_rounds=2, error_propagation=True)
    assert RocketConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    model = tiny_llama()
    data = prepare_calibration(tiny_tok, CAL, model)
    return model, data, run_profile(model, tiny_tok, RocketConfig(), CAL, data=data, progress=False)


def _calib_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("fields", [{"refit_rounds": 2}, {"error_propagation": True},
                                    {"error_propagation": True, "refit_rounds": 1}])
def test_levers_compress_same_bytes(tiny, tiny_tok, fields):
    model, data, prof = tiny
    base = compress(model, tiny_tok, RocketConfig(budget=0.3, safeguard=False, refit_rounds=0), CAL, data=data,
                    profile=prof, progress=False)
    lev = compress(model, tiny_tok, RocketConfig(budget=0.3, safeguard=False, **{"refit_rounds": 0, **fields}), CAL, data=data,
                   profile=prof, progress=False)
    assert lev.manifest["config"]["refit_rounds"] == fields.get("refit_rounds", 0)
    assert lev.manifest["budget"]["compressed_bytes"] == base.manifest["budget"]["compressed_bytes"]
    for name, rec in base.manifest["layers"].items():
        assert lev.manifest["layers"][name]["rank"] == rec["rank"]
        if "refit_rounds" in fields and "error_propagation" not in fields and rec["kind"] == "rocket":
            assert lev.manifest["layers"][name]["whitened_sq"] <= rec["whitened_sq"] * 1.001 + 1e-12
    assert any(isinstance(m, RocketLinear) for m in lev.model.modules())
    ids = data.calib.ids
    assert _calib_loss(lev.model, ids) < _calib_loss(model, ids) + 2.0     # still a working model
    if fields.get("error_propagation"):
        assert all(r.get("propagated") for r in lev.manifest["layers"].values() if r["kind"] == "rocket")


def test_error_propagation_needs_calibration_data(tiny, tiny_tok):
    model, data, prof = tiny
    with pytest.raises(ValueError, match="error_propagation"):
        compress(model, tiny_tok, RocketConfig(budget=0.3, error_propagation=True), CAL, profile=prof,
                 progress=False)


def test_cli_levers_saved_in_artifact(tiny_llama_dir, tmp_path):
    import json
    import os
    from click.testing import CliRunner
    from rocket_deploy.cli import main
    out = str(tmp_path / "lev")
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", "0.3", "--out", out, "--refit-rounds", "2",
                                  "--error-propagation", "--calib-samples", "8", "--seq-len", "32",
                                  "--eval-samples", "4", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with open(os.path.join(out, "rocket.json")) as f:
        cfg = json.load(f)["config"]
    assert cfg["refit_rounds"] == 2 and cfg["error_propagation"] is True
    bad = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--out", str(tmp_path / "x"), "--refit-rounds", "-1"])
    assert bad.exit_code != 0 and "refit-rounds" in bad.output
