"""Issue-7 features: objectives, output sensitivity, safeguard, model-sampled text, disjoint held-out text."""
import dataclasses
import os

import pytest
import torch

from rocket_deploy.compress import pipeline
from rocket_deploy.compress.allocate import allocate, resolve_objective
from rocket_deploy.compress.pipeline import compress, load_or_profile, prepare_calibration, run_profile
from rocket_deploy.selfgen import sample_texts, selfgen_documents
from rocket_deploy.compress.sensitivity import output_sensitivity, sensitivity_rows
from rocket_deploy.config import CalibrationConfig, ConfigError, RocketConfig
from rocket_deploy.corpus import load_source, split_documents
from rocket_deploy.evaluation import heldout_split
from rocket_deploy.targets import select_targets
from rocket_deploy.testing import tiny_bert, tiny_llama

CAL = CalibrationConfig(samples=8, seq_len=32, eval_samples=4)


@pytest.fixture(scope="module")
def llama_profile(tiny_tok):
    model = tiny_llama()
    data = prepare_calibration(tiny_tok, CAL, model)
    return model, data, run_profile(model, tiny_tok, RocketConfig(), CAL, data=data, progress=False)


def test_sensitivity_matches_autograd(tiny_tok):
    model = tiny_llama()
    targets = select_targets(model, RocketConfig().targets, RocketConfig().exclude)
    ids = torch.randint(0, 500, (2, 16))
    sens = output_sensitivity(model, targets, ids, batch_size=2)
    name = "model.layers.1.mlp.down_proj"
    saved = {}

    def keep(_m, _a, out):
        out.retain_grad()
        saved["y"] = out
    h = targets[name].register_forward_hook(keep)
    out = model(input_ids=ids, labels=ids)
    (out.loss * ids[:, 1:].numel()).backward()
    h.remove()
    g = saved["y"].grad.reshape(-1, saved["y"].shape[-1]).double()
    ref = g.pow(2).sum(0) / ids[:, 1:].numel()
    assert torch.allclose(sens[name].double(), ref, rtol=1e-4, atol=1e-12)
    assert sens[name].shape == (targets[name].out_features,) and float(sens[name].sum()) > 0


def test_sensitivity_refuses_encoders():
    bert = tiny_bert()
    targets = select_targets(bert, RocketConfig().targets, RocketConfig().exclude)
    with pytest.raises(ValueError, match="causal language model"):
        output_sensitivity(bert, targets, torch.randint(0, 500, (1, 8)))


@pytest.mark.parametrize("objective", ["fisher", "rel-original", "rel-whitened", "whitened-energy"])
def test_every_objective_allocates_within_budget(llama_profile, objective):
    _, _, prof = llama_profile
    a = allocate(prof, RocketConfig(budget=0.3, objective=objective))
    assert a.total_bytes <= a.budget_bytes and a.objective == objective
    assert any(o is not None for o in a.choice.values())


def test_auto_objective(llama_profile, tiny_tok):
    _, _, prof = llama_profile
    assert resolve_objective(prof, "auto") == "fisher"
    bert = tiny_bert()
    bprof = run_profile(bert, tiny_tok, RocketConfig(), CAL, progress=False)
    assert resolve_objective(bprof, "auto") == "rel-original"
    with pytest.raises(ValueError, match="causal LMs"):
        resolve_objective(bprof, "fisher")


def test_fisher_options_recorded(llama_profile):
    _, _, prof = llama_profile
    opts = [o for lp in prof.layers.values() for o in lp.options]
    assert all(o.fisher >= 0 for o in opts) and any(o.fisher > 0 for o in opts)


def test_safeguard_keeps_the_better_allocation(llama_profile, tiny_tok, monkeypatch):
    model, data, prof = llama_profile
    res = compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False)
    g = res.manifest["allocation"]["safeguard"]
    assert g["chosen"] == ("uniform" if g["uniform"] < g["knapsack"] else "knapsack")
    # force the uniform candidate to look better: its layers must then be uniform ROCKET's
    calls = iter([10.0, 1.0])
    monkeypatch.setattr(pipeline, "heldout_quality", lambda *a: next(calls))
    res = compress(model, tiny_tok, RocketConfig(budget=0.3), CAL, data=data, profile=prof, progress=False)
    assert res.manifest["allocation"]["safeguard"]["chosen"] == "uniform"
    uni = compress(model, tiny_tok, RocketConfig(budget=0.3, method="rocket-uniform"), CAL, data=data,
                   profile=prof, progress=False)
    assert {n: (r["rank"], r["keep"]) for n, r in res.manifest["layers"].items()} == \
        {n: (r["rank"], r["keep"]) for n, r in uni.manifest["layers"].items()}
    # compared unrefitted, but the winner is built with its refits: the same layers as a direct build
    assert res.manifest["allocation"]["safeguard"]["compared_without_refit"] is True
    assert {n: r["whitened_sq"] for n, r in res.manifest["layers"].items()} == \
        pytest.approx({n: r["whitened_sq"] for n, r in uni.manifest["layers"].items()}, rel=1e-9)
    quick = compress(model, tiny_tok, RocketConfig(budget=0.3, method="rocket-uniform", refit_rounds=0), CAL,
                     data=data, profile=prof, progress=False)
    assert sum(r["whitened_sq"] for r in res.manifest["layers"].values()) < \
        sum(r["whitened_sq"] for r in quick.manifest["layers"].values())


def test_no_safeguard_flag(llama_profile, tiny_tok):
    model, data, prof = llama_profile
    res = compress(model, tiny_tok, RocketConfig(budget=0.3, safeguard=False), CAL, data=data, profile=prof,
                   progress=False)
    assert "safeguard" not in res.manifest["allocation"]


def test_selfgen_is_seeded_and_cached(tiny_tok, tmp_path, monkeypatch):
    model = tiny_llama()
    a = sample_texts(model, tiny_tok, 3, 12, seed=5)
    b = sample_texts(model, tiny_tok, 3, 12, seed=5)
    c = sample_texts(model, tiny_tok, 3, 12, seed=6)
    assert [d.text for d in a] == [d.text for d in b] != [d.text for d in c]
    monkeypatch.setenv("ROCKET_CACHE", str(tmp_path))
    docs, path = selfgen_documents(model, tiny_tok, 3, 12, seed=5)
    assert os.path.isfile(path) and [d.text for d in docs] == [d.text for d in a]
    os.utime(path, None)
    docs2, path2 = selfgen_documents(model, tiny_tok, 3, 12, seed=5)
    assert path2 == path and [d.text for d in docs2] == [d.text for d in docs]


def test_heldout_never_overlaps_calibration(tiny_tok):
    cal = CalibrationConfig(sources=("stdlib", "pyref"), samples=8, seq_len=32, eval_samples=4)
    for src in cal.sources:
        docs = load_source(src)
        calib, held = split_documents(docs, cal.heldout_fraction, cal.seed)
        assert not ({d.text for d in calib} & {d.text for d in held})
        sp = heldout_split(tiny_tok, cal, src)
        # the held-out chunks decode to text found only in held-out documents
        first = tiny_tok.decode(sp.ids[0, :16])
        assert any(first.strip()[:20] in d.text for d in held)


def test_encoder_skips_selfgen(tiny_tok):
    data = prepare_calibration(tiny_tok, CAL, tiny_bert())
    assert "selfgen" in data.info["skipped_sources"] and "selfgen" not in data.info["sources"]


def test_sensitivity_pass_uses_an_even_spread_of_the_calibration(tiny_tok, tmp_path, monkeypatch):
    """--sensitivity-samples: the backward pass sees that many sequences, spread over every source; a profile made
    with another count is not reused (its fisher errors weigh other sensitivities)."""
    assert sensitivity_rows(64, 16).tolist() == [round(i * 63 / 15) for i in range(16)]
    assert sensitivity_rows(8, 16).tolist() == list(range(8))
    model = tiny_llama()
    cal = CalibrationConfig(sources=("stdlib", "pyref"), samples=8, seq_len=32, eval_samples=4, sensitivity_samples=3)
    data = prepare_calibration(tiny_tok, cal, model)
    seen = []
    real = pipeline.output_sensitivity

    def spy(m, t, ids, *a, **k):
        seen.append(ids)
        return real(m, t, ids, *a, **k)
    monkeypatch.setattr(pipeline, "output_sensitivity", spy)
    prof = load_or_profile(model, tiny_tok, RocketConfig(), cal, data, str(tmp_path / "p"), progress=False)
    assert torch.equal(seen[0], data.calib.ids[[0, 4, 7]]) and prof.calibration["sensitivity_samples"] == 3
    msgs = []
    load_or_profile(model, tiny_tok, RocketConfig(), cal, data, str(tmp_path / "p"), progress=False, log=msgs.append)
    assert msgs == [f"reusing profile in {tmp_path / 'p'}"] and len(seen) == 1
    load_or_profile(model, tiny_tok, RocketConfig(), dataclasses.replace(cal, sensitivity_samples=8), data,
                    str(tmp_path / "p"), progress=False, log=msgs.append)
    assert "sensitivity pass used 3" in msgs[-1] and len(seen) == 2 and seen[1].shape[0] == 8
    with pytest.raises(ConfigError, match="sensitivity_samples"):
        CalibrationConfig(sensitivity_samples=0)
