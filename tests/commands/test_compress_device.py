"""`compress --device` (checked before the model loads, recorded in the manifest), the stage times of the report
(`seconds`: every stage, `reused` for a profile from --profile-dir) and the first-run progress bars."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rocket_deploy.cli import main

FAST = ["--calib-samples", "8", "--seq-len", "32", "--eval-samples", "4"]
STAGES = ["selfgen", "calibration", "sensitivity", "profile", "allocate", "materialize", "safeguard", "evaluation",
          "save"]


def run(args, **kw):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kw)


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def manifest(path):
    with open(os.path.join(path, "rocket.json")) as f:
        return json.load(f)


def _no_model_load(monkeypatch):
    import rocket_deploy.models as models

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the device was checked")
    monkeypatch.setattr(models, "load_model", refuse)


def test_device_cpu_gives_the_same_artifact_as_no_flag(tiny_llama_dir, tmp_path):
    a, b = str(tmp_path / "default"), str(tmp_path / "cpu")
    ra = run(["compress", tiny_llama_dir, "--out", a, *FAST, "--quiet", "--json"])
    rb = run(["compress", tiny_llama_dir, "--out", b, "--device", "cpu", *FAST, "--quiet", "--json"])
    assert ra.exit_code == 0 and rb.exit_code == 0, ra.output + rb.output
    ma, mb = manifest(a), manifest(b)
    assert ma["files"].keys() == mb["files"].keys()
    for name in ma["files"]:    # safetensors headers list their metadata in any order: compare tensors there
        if name.endswith(".safetensors"):
            ta, tb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        else:
            assert ma["files"][name] == mb["files"][name], name
    assert ma["layers"] == mb["layers"] and ma["allocation"] == mb["allocation"]
    assert ma["device"] == mb["device"] == "cpu" == last_json(rb)["device"]


def test_cuda_without_cuda_is_a_usage_error_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_model_load(monkeypatch)
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--device", "cuda", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "CUDA is not available" in errors[0], r.stderr
    assert "built without CUDA" in errors[0] and "--device cpu" in errors[0] and "CUDA build of torch" in errors[0]
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()


def test_cuda_build_without_a_gpu_names_the_driver(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_model_load(monkeypatch)
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--device", "cuda:0", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "sees no GPU" in r.stderr and "CUDA_VISIBLE_DEVICES" in r.stderr, r.output


def test_cuda_index_beyond_the_device_count(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _no_model_load(monkeypatch)
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--device", "cuda:7", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(err) == 1 and "cuda:7 does not exist" in err[0] and "has 2: cuda:0, cuda:1" in err[0], r.stderr
    assert "--device cuda:0 .. cuda:1" in err[0]


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "cpu:1", "gpu"])
def test_unknown_device_names(tiny_llama_dir, tmp_path, monkeypatch, bad):
    _no_model_load(monkeypatch)
    r = CliRunner().invoke(main, ["compress", tiny_llama_dir, "--device", bad, "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "use cpu, cuda or cuda:N" in r.stderr, r.output


def test_library_checks_the_device_too(monkeypatch):
    from rocket_deploy.devices import DeviceError, resolve_device
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


def test_seconds_time_every_stage_and_a_reused_profile_says_so(tiny_llama_dir, tmp_path):
    prof, a, b = str(tmp_path / "prof"), str(tmp_path / "a"), str(tmp_path / "b")
    r1 = run(["compress", tiny_llama_dir, "--out", a, "--profile-dir", prof, *FAST, "--quiet"])
    assert r1.exit_code == 0, r1.output
    s1 = last_json(r1)["seconds"]
    assert manifest(a)["seconds"] == s1                   # the saved manifest has the final times, save included
    assert list(manifest(a)["seconds"]) == STAGES + ["total"]       # in the order they run
    assert all(isinstance(s1[k], float) and s1[k] >= 0 for k in STAGES), s1
    assert s1["profile"] > 0 and s1["total"] >= sum(s1[k] for k in STAGES) - 0.05 * len(STAGES)
    with open(os.path.join(prof, "timings.json")) as f:
        assert json.load(f) == {"device": "cpu", "seconds": {"sensitivity": s1["sensitivity"], "profile": s1["profile"]}}
    for stage in STAGES:                                  # the report table lists every stage
        assert any(ln.split()[:1] == [stage] for ln in r1.stdout.splitlines()), (stage, r1.stdout)

    r2 = run(["compress", tiny_llama_dir, "--out", b, "--profile-dir", prof, *FAST, "--quiet"])
    assert r2.exit_code == 0, r2.output
    s2 = manifest(b)["seconds"]
    assert s2["profile"] == "reused" and s2["sensitivity"] == "reused"
    assert s2["profile_original"] == {"sensitivity": s1["sensitivity"], "profile": s1["profile"]}
    assert isinstance(s2["materialize"], float) and s2["total"] > 0
    row = next(ln for ln in r2.stdout.splitlines() if ln.startswith("profile "))
    assert "reused (0 s" in row and f"made in {s1['profile']} s" in row, r2.stdout
    assert last_json(r2)["seconds"] == s2


def test_no_safeguard_marks_the_stages_not_run(tiny_llama_dir, tmp_path):
    r = run(["compress", tiny_llama_dir, "--out", str(tmp_path / "a"), "--no-safeguard", *FAST, "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    s = last_json(r)["seconds"]
    assert s["safeguard"] is None and s["evaluation"] is None and s["materialize"] > 0


def test_first_run_steps_show_progress_unless_quiet(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ROCKET_CACHE", str(tmp_path / "cache"))       # nothing sampled yet: the bar must show
    r = run(["compress", tiny_llama_dir, "--out", str(tmp_path / "a"), *FAST])
    assert r.exit_code == 0, r.output
    assert "sample calibration text" in r.stderr and "seq" in r.stderr, r.stderr
    assert "sensitivity" in r.stderr and "batch" in r.stderr, r.stderr
    assert "sample calibration text" not in r.stdout
    monkeypatch.setenv("ROCKET_CACHE", str(tmp_path / "cache2"))
    r = run(["compress", tiny_llama_dir, "--out", str(tmp_path / "b"), *FAST, "--quiet"])
    assert r.exit_code == 0, r.output
    assert "sample calibration text" not in r.stderr and "sensitivity:" not in r.stderr, r.stderr


@pytest.mark.gpu
def test_cuda_gives_the_cpu_allocation(tiny_llama_dir, tmp_path):
    a, b = str(tmp_path / "cpu"), str(tmp_path / "cuda")
    ra = run(["compress", tiny_llama_dir, "--out", a, "--device", "cpu", *FAST, "--quiet", "--json"])
    rb = run(["compress", tiny_llama_dir, "--out", b, "--device", "cuda", *FAST, "--quiet", "--json"])
    assert ra.exit_code == 0 and rb.exit_code == 0, ra.output + rb.output
    ma, mb = manifest(a), manifest(b)
    assert mb["device"].startswith("cuda:") and ma["device"] == "cpu"
    la, lb = ma["layers"], mb["layers"]
    same = sum((la[n]["rank"], la[n]["keep"]) == (lb[n]["rank"], lb[n]["keep"]) for n in la)
    assert same >= 0.9 * len(la), (same, len(la))
    assert abs(ma["budget"]["removed_bytes_fraction"] - mb["budget"]["removed_bytes_fraction"]) < 0.01
    pa, pb = ma["allocation"]["predicted_error"], mb["allocation"]["predicted_error"]
    assert abs(pa - pb) <= 1e-3 * abs(pa) + 1e-9, (pa, pb)
    for n in la:
        if (la[n]["rank"], la[n]["keep"]) == (lb[n]["rank"], lb[n]["keep"]):
            assert la[n]["rel_whitened"] == pytest.approx(lb[n]["rel_whitened"], rel=1e-3, abs=1e-6), n
