"""Benchmark library and command, and the budget sweep, on tiny models with short settings."""
import json
import os

import pytest
from click.testing import CliRunner

from rocket_deploy.cli import main
from rocket_deploy.export import export_artifact
from rocket_deploy.runtime.bench import BenchConfig, bench_engine, bench_side_by_side, peak_rss_bytes
from rocket_deploy.runtime.ort_backend import OrtEngine
from rocket_deploy.runtime.torch_backend import TorchEngine
from rocket_deploy.testing import tiny_llama

from _rocket_fixtures import make_artifact


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("bench")
    art = make_artifact(tiny_llama(seed=1), tiny_tok, str(root / "art"))
    res = export_artifact(art, str(root / "onnx"), validate=False)
    return art, res.path


def test_bench_engine_stats(exported):
    _, path = exported
    cfg = BenchConfig(batches=(1, 2), prompt_len=8, gen_len=5, warmup=1, runs=4)
    res = bench_engine(OrtEngine(path), cfg)
    assert res["backend"] == "ort" and res["model_bytes"] == os.path.getsize(path)
    assert res["peak_rss_bytes"] >= 10 * 2 ** 20 and res["peak_rss_bytes"] <= peak_rss_bytes()
    assert [r["batch"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["runs"] == 4
        assert 0 < r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["latency_ms_min"] <= r["latency_ms_mean"]
        assert 0 < r["prefill_ms_median"] < r["latency_ms_median"] * 1.5
        assert r["decode_tokens_per_s"] > 0 and r["decode_ms_per_step"] > 0
    with pytest.raises(ValueError):
        BenchConfig(batches=(0,))


def test_side_by_side_same_tokens(exported):
    art, path = exported
    engines = {"torch": TorchEngine.from_path(art, device="cpu"), "ort": OrtEngine(path)}
    res = bench_side_by_side(engines, BenchConfig(prompt_len=6, gen_len=4, warmup=0, runs=2))
    assert set(res) == {"torch", "ort"} and res["torch"]["backend"] == "torch"
    from rocket_deploy.runtime.bench import greedy_tokens
    assert greedy_tokens(engines["torch"], [3, 4, 5], 16) == greedy_tokens(engines["ort"], [3, 4, 5], 16)


def _run(args):
    return CliRunner().invoke(main, args)


def _last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_cli(exported):
    art, path = exported
    r = _run(["bench", path, "--batch", "1,2", "--prompt-len", "8", "--gen-len", "4", "--runs", "2", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    assert "decode tok/s" in r.output and "p99 ms" in r.output
    j = _last_json(r)
    assert j["backend"] == "ort" and [x["batch"] for x in j["rows"]] == [1, 2] and j["model_bytes"] > 0
    r = _run(["bench", os.path.dirname(path), "--prompt-len", "4", "--gen-len", "3", "--runs", "1", "--json"])
    assert r.exit_code == 0 and _last_json(r)["backend"] == "ort"                # export folder -> ort
    r = _run(["bench", art, "--prompt-len", "4", "--gen-len", "3", "--runs", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert _last_json(r)["backend"] == "torch"                                    # artifact -> torch


def test_bench_cli_errors(exported, tmp_path):
    art, path = exported
    r = _run(["bench", str(tmp_path / "none.onnx")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = _run(["bench", path, "--batch", "1,x"])
    assert r.exit_code == 2 and "--batch" in r.output
    r = _run(["bench", path, "--backend", "torch"])
    assert r.exit_code == 2 and "artifact directory" in r.output and "Traceback" not in r.output
    r = _run(["bench", path, "--backend", "onnx"])
    assert r.exit_code == 2 and "--backend" in r.output


def test_sweep_cli(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "sweep")
    r = _run(["sweep", tiny_llama_dir, "--budgets", "0.5,0.3", "--out", out, "--calib", "stdlib",
              "--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4", "--byte-fractions", "0.4,0.6,0.8",
              "--keep-ratios", "1,0.5", "--prompt-len", "8", "--gen-len", "4", "--runs", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "dense" in r.output and "rocket-0.3" in r.output and "speedup" in r.output
    j = _last_json(r)
    assert [x["name"] for x in j["rows"]] == ["dense", "rocket-0.3", "rocket-0.5"]
    res = json.load(open(os.path.join(out, "results.json")))
    dense, r3, r5 = res["rows"]
    assert dense["quality"] > 1 and r3["quality"] > 1 and r5["quality"] > 1
    assert r5["removed_bytes_fraction"] > r3["removed_bytes_fraction"] >= 0.3 - 1e-9
    assert r5["file_bytes"] < r3["file_bytes"]
    assert all(x["validation_passed"] and x["decode_tokens_per_s"] > 0 for x in res["rows"])
    assert open(os.path.join(out, "sweep.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for d in ("dense-onnx", "rocket-0.3-onnx", "rocket-0.5-onnx", "rocket-0.3"):
        assert os.path.isdir(os.path.join(out, d)), d


def test_sweep_bad_budgets(tiny_llama_dir, tmp_path):
    r = _run(["sweep", tiny_llama_dir, "--budgets", "0.3,1.2", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--budgets" in r.output
