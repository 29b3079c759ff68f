"""Evaluation beyond perplexity (KL from the dense model, top-1 agreement), never-calibrated domains, eval CLI."""
import copy
import json
import math
import os

import pytest
import torch
from click.testing import CliRunner

from rocket_deploy.cli import main
from rocket_deploy.config import CalibrationConfig
from rocket_deploy.corpus import NEVER_CALIBRATED, SYSTEM_SOURCES, load_source, roff_to_text
from rocket_deploy.evaluation import (DomainResult, compare, expand_domains, heldout_split,
                                      never_calibrated_summary)
from rocket_deploy.perplexity import distribution_stats, fidelity_vs_dense, perplexity
from rocket_deploy.testing import tiny_llama


def test_distribution_stats_exact():
    ref = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    got = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]]]))
    kl, agree = distribution_stats(got, ref)
    # only the first two positions predict a next token; KL(ref || got) at position 0 is 0.25 ln 2, at 1 zero
    assert kl == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), abs=1e-6)
    assert agree == 1                                   # position 0: argmax 0 vs 1; position 1: both 1
    assert distribution_stats(ref, ref) == (pytest.approx(0.0, abs=1e-7), 2)


@pytest.fixture(scope="module")
def models():
    dense = tiny_llama(seed=0).eval()
    noisy = copy.deepcopy(dense)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dense, noisy


def test_fidelity_streams_and_matches_perplexity(models):
    dense, noisy = models
    ids = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    same = fidelity_vs_dense(dense, dense, ids, batch_size=4)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    f1 = fidelity_vs_dense(noisy, dense, ids, batch_size=1)
    f4 = fidelity_vs_dense(noisy, dense, ids, batch_size=4)
    for k in ("perplexity", "dense_perplexity", "kl", "top1_agreement"):
        assert f1[k] == pytest.approx(f4[k], rel=1e-4)
    assert f4["kl"] > 1e-4 and 0 <= f4["top1_agreement"] < 1 and f4["tokens"] == 6 * 23
    assert f4["perplexity"] == pytest.approx(perplexity(noisy, ids), rel=1e-5)
    assert f4["dense_perplexity"] == pytest.approx(perplexity(dense, ids), rel=1e-5)
    sp = type("S", (), {"domain": "x", "n_tokens": ids.numel(), "ids": ids})()
    r = compare(noisy, dense, [sp])[0]
    assert (r.kl, r.top1_agreement, r.compressed) == pytest.approx((f4["kl"], f4["top1_agreement"], f4["perplexity"]))


def test_never_calibrated_summary_and_expansion():
    cal = CalibrationConfig(sources=("stdlib", "faq"))
    rs = [DomainResult("stdlib", 10, 10.0, 12.0, 0.1, 0.9), DomainResult("faq", 10, 10.0, 30.0, 0.5, 0.5),
          DomainResult("manpages", 10, 10.0, 15.0, 0.2, 0.8), DomainResult("copyright", 10, 10.0, 20.0, 0.3, 0.7)]
    s = never_calibrated_summary(rs, cal)
    assert s["domains"] == ["manpages", "copyright"] and s["worst_domain"] == "copyright"
    assert s["worst_ratio"] == 2.0 and s["mean_ratio"] == 1.75 and s["mean_kl"] == pytest.approx(0.25)
    assert never_calibrated_summary(rs[:2], cal) is None
    names = expand_domains(["stdlib", "never-calibrated", "stdlib"], cal)
    assert names[0] == "stdlib" and names.count("stdlib") == 1 and "faq" not in names
    assert set(names[1:]) <= set(NEVER_CALIBRATED)


def test_roff_to_text():
    src = ('.\\" comment\n.de XX\nbogus\n..\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.PP\n'
           'List the \\fBFILEs\\fR (the \\fIcurrent\\fP directory).\n.TP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n')
    out = roff_to_text(src)
    assert "bogus" not in out and "comment" not in out and "\\" not in out
    assert "NAME" in out and "ls - list directory contents" in out and "List the FILEs (the current directory)." in out
    assert "-a, --all" in out


@pytest.mark.parametrize("name", sorted(SYSTEM_SOURCES))
def test_system_sources(name, tiny_tok):
    docs = load_source(name)
    if not docs:
        pytest.skip(f"no {name} text on this machine")
    assert all(d.domain == name and len(d.text) >= 200 for d in docs)
    assert load_source(name) == docs                    # deterministic order
    cal = CalibrationConfig(sources=("stdlib",), seq_len=64, eval_samples=4)
    sp = heldout_split(tiny_tok, cal, name)
    assert sp.ids.shape == (4, 64) and sp.domain == name


def test_copyright_holds_out_calibration_license_paragraphs():
    docs = load_source("copyright")
    if not docs:
        pytest.skip("no Debian copyright files here")
    from rocket_deploy.corpus import _norm, installed_licenses
    known = {_norm(p) for d in installed_licenses() for p in d.text.split("\n\n")}
    assert not any(_norm(p) in known for d in docs for p in d.text.split("\n\n") if len(p) > 80)


def test_eval_cli_reports_kl_top1_and_never_calibrated(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "a")
    fast = ["--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--quiet"]
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--budget", "0.3", "--out", out, "--calib", "stdlib",
                                  *fast], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doms = "stdlib,never-calibrated" if any(load_source(d) for d in SYSTEM_SOURCES) else "stdlib,pkgdocs"
    r = CliRunner().invoke(main, ["eval", out, "--domains", doms, "--samples", "2", "--seq-len", "32"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "KL (nats/token)" in r.output and "top-1 agreement" in r.output and "never-calibrated domains" in r.output
    j = json.loads(r.output.strip().splitlines()[-1])
    st = j["domains"]["stdlib"]
    assert st["kl"] > 0 and 0 <= st["top1_agreement"] <= 1
    nc = j["never_calibrated"]
    assert "stdlib" not in nc["domains"] and nc["worst_ratio"] >= nc["mean_ratio"] > 0
