"""``--method dense-quant`` profiles only what it uses: each layer's dense weight quantized (no eigendecomposition,
no candidate grid), gives the artifact a full profile gives, and no ROCKET run reuses such a profile."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import rocket_deploy.compress.profile as P
from rocket_deploy.compress.pipeline import compress, load_or_profile, prepare_calibration, run_profile
from rocket_deploy.compress.profile import Profile, profile_mismatch
from rocket_deploy.config import CalibrationConfig, RocketConfig
from rocket_deploy.testing import tiny_llama

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4, sources=("stdlib",))
QUANT = {"quantize": "int4", "quant_group_size": 32}
DQ = RocketConfig(method="dense-quant", **QUANT)
GRID = {"byte_fractions": (0.3, 0.6), "keep_ratios": (1.0, 0.5)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tiny_tok):
    return prepare_calibration(tiny_tok, CAL, tiny_llama())


def _count_eigh(monkeypatch) -> list:
    calls = []
    orig = P.eigenbasis

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)
    monkeypatch.setattr(P, "eigenbasis", counting)
    return calls


def _eigen_files(d: str) -> list[str]:
    return [n for n in os.listdir(d) if n.startswith("model.") and n.endswith(".safetensors")]


def test_dense_quant_profiles_no_eigenbasis(tiny_tok, data, tmp_path, monkeypatch):
    calls = _count_eigh(monkeypatch)
    prof = run_profile(tiny_llama(), tiny_tok, DQ, CAL, data=data, cache_dir=str(tmp_path / "dq"), progress=False)
    assert calls == [] and _eigen_files(str(tmp_path / "dq")) == []
    assert prof.dense_only and prof.grid == {"dense_only": True, "gram_damping": 0.0, "quantize": "int4",
                                             "quant_group_size": 32, "quant_method": "gptq", "quant_act_order": True}
    assert prof.layers and all(lp.options == [] and lp.dense_option is not None and lp.dense_option.rank == 0
                               and lp.dense_option.rel_whitened > 0 for lp in prof.layers.values())
    # a ROCKET run of the same model does compute them (the counter counts)
    run_profile(tiny_llama(), tiny_tok, RocketConfig(**QUANT, **GRID), CAL, data=data,
                cache_dir=str(tmp_path / "full"), progress=False)
    assert len(calls) == len(prof.layers) == len(_eigen_files(str(tmp_path / "full")))
    # saved and loaded back: the whitening alone, exact (z = S W, rank 0)
    back = Profile.load(str(tmp_path / "dq"))
    assert back.dense_only and back.layers == prof.layers
    name, lp = next(iter(back.layers.items()))
    model = tiny_llama()
    eb = back.eigenbasis(name, P.weight_in_out(dict(model.named_modules())[name]))
    assert eb.basis.shape == (lp.d_in, 0) and eb.coeffs.shape == (0, lp.d_out)
    assert eb.z_norm ** 2 == pytest.approx(lp.z_sq, rel=1e-6)


def _same_artifact(a: str, b: str) -> None:
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for n in os.listdir(a):
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        if n == "rocket.json":
            ma, mb = json.load(open(pa)), json.load(open(pb))
            la, lb = ma.pop("layers"), mb.pop("layers")
            for m in (ma, mb):
                m.pop("timings_s", None), m.pop("seconds", None)
                m["files"] = sorted(m.get("files", {}))
            assert ma == mb
            assert la.keys() == lb.keys()
            for layer in la:       # errors measured against ||S W|| exactly instead of from the float32 basis
                ra, rb = la[layer], lb[layer]
                assert ra.keys() == rb.keys()
                for k in ra:
                    assert ra[k] == (pytest.approx(rb[k], rel=1e-6) if isinstance(ra[k], float) else rb[k]), (layer, k)
        elif n.endswith(".safetensors"):
            with safe_open(pa, "pt") as fa, safe_open(pb, "pt") as fb:
                assert sorted(fa.keys()) == sorted(fb.keys())
                assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()), n
        else:
            assert open(pa, "rb").read() == open(pb, "rb").read(), n


def test_dense_quant_artifact_equals_the_one_from_a_full_profile(tiny_tok, data, tmp_path):
    """Before, dense-quant profiled every ROCKET candidate: a full profile with the same quantization gives what
    it gave. The dense-only profile gives the same weights, bit for bit, and the same layer records."""
    dense = run_profile(tiny_llama(), tiny_tok, DQ, CAL, data=data, cache_dir=str(tmp_path / "p-dq"), progress=False)
    full = run_profile(tiny_llama(), tiny_tok, RocketConfig(**QUANT, **GRID), CAL, data=data,
                       cache_dir=str(tmp_path / "p-full"), progress=False)
    assert profile_mismatch(full, DQ, data.info) is None      # a full profile still serves dense-quant
    for prof, out in ((dense, "a-dq"), (full, "a-full")):
        compress(tiny_llama(), tiny_tok, DQ, CAL, data=data, profile=prof, out=str(tmp_path / out), progress=False)
    _same_artifact(str(tmp_path / "a-dq"), str(tmp_path / "a-full"))


def test_rocket_refuses_a_dense_only_profile(tiny_tok, data, tmp_path):
    pd = str(tmp_path / "prof")
    dense = run_profile(tiny_llama(), tiny_tok, DQ, CAL, data=data, cache_dir=pd, progress=False)
    rocket = RocketConfig(**QUANT, **GRID)
    why = profile_mismatch(dense, rocket, data.info)
    assert why and "dense-quant" in why and "'rocket'" in why
    assert "dense-quant" in profile_mismatch(dense, rocket.replace(method="svd-llm"), data.info)
    assert profile_mismatch(dense, DQ, data.info) is None
    assert profile_mismatch(dense, DQ.replace(byte_fractions=(0.5,)), data.info) is None   # no grid in it
    assert "quant_method" in profile_mismatch(dense, DQ.replace(quant_method="rtn"), data.info)
    assert "gram_damping" in profile_mismatch(dense, DQ.replace(gram_damping=0.1), data.info)
    with pytest.raises(ValueError, match="dense-quant"):
        compress(tiny_llama(), tiny_tok, rocket, CAL, data=data, profile=dense, progress=False)
    # through --profile-dir: the ROCKET run profiles again (into the same directory) instead of reusing it
    logs = []
    again = load_or_profile(tiny_llama(), tiny_tok, rocket, CAL, data, pd, progress=False, log=logs.append)
    assert any("cannot be reused" in m and "dense-quant" in m for m in logs), logs
    assert not again.dense_only and len(_eigen_files(pd)) == len(again.layers)
    # and dense-quant reuses that full profile rather than replacing it
    logs.clear()
    assert load_or_profile(tiny_llama(), tiny_tok, DQ, CAL, data, pd, progress=False, log=logs.append).grid == again.grid
    assert any("reusing" in m for m in logs)
