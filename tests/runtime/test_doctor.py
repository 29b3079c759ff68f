"""``rocket-deploy doctor`` (commands/doctor_cmd.py over runtime/diagnostics.py): every check listed, JSON output,
``--strict``, checks that never raise, and the TensorRT / plugin / nvcc checks using the same import and the same
nvcc finder as the code they stand for."""
from __future__ import annotations

import json
import os
import stat
import sys
import types

from click.testing import CliRunner
from fake_tensorrt import no_plugin, no_tensorrt  # noqa: F401 -- fixtures
from fake_tensorrt import plugin_registry_module

from rocket_deploy.onnx_contract import PLUGIN_NAME
from rocket_deploy.runtime import diagnostics, kernel_ext
from rocket_deploy.runtime.trt import plugins


def _cli(*args):
    from rocket_deploy.cli import main
    return CliRunner().invoke(main, list(args))


def test_doctor_lists_every_check():
    res = _cli("doctor")
    assert res.exit_code == 0, res.output
    for name in diagnostics.check_names():
        assert name in res.output
    assert "usable" in res.output


def test_doctor_json():
    res = _cli("doctor", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)        # stderr (TensorRT warnings, if any) stays out of the JSON
    assert [d["name"] for d in data] == diagnostics.check_names()
    for d in data:
        assert set(d) == {"name", "ok", "detail", "fix", "required"}
        assert isinstance(d["ok"], bool) and d["detail"]
        if not d["ok"]:
            assert d["fix"], d


def test_doctor_strict(monkeypatch):
    from rocket_deploy.runtime.diagnostics import Check
    ok = Check("a", True, "fine", required=True)
    optional_bad = Check("b", False, "missing", "install b")
    monkeypatch.setattr(diagnostics, "run_checks", lambda: [ok, optional_bad])
    assert _cli("doctor", "--strict").exit_code == 0      # optional failures never fail
    monkeypatch.setattr(diagnostics, "run_checks", lambda: [ok, Check("c", False, "gone", "pip install c", True)])
    res = _cli("doctor", "--strict")
    assert res.exit_code == 1 and "pip install c" in res.output
    assert _cli("doctor").exit_code == 0                  # without --strict: always 0


def test_diagnostics_without_tensorrt(no_tensorrt, no_plugin):
    by_name = {c.name: c for c in diagnostics.run_checks()}
    assert not by_name["tensorrt"].ok and "pip install 'rocket-deploy[tensorrt]'" in by_name["tensorrt"].fix
    plug = by_name["TensorRT plugin library"]
    assert not plug.ok and "cmake -S plugins_trt" in plug.fix
    assert by_name["torch"].ok and by_name["onnx"].ok


def test_diagnostics_plugin_found_but_no_tensorrt(monkeypatch, tmp_path, no_tensorrt, no_plugin):
    lib = tmp_path / plugins.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(lib))
    c = diagnostics.check_trt_plugin()
    assert not c.ok and str(lib) in c.detail and "TensorRT is not importable" in c.detail


def test_diagnostics_check_never_raises(monkeypatch):
    monkeypatch.setattr(kernel_ext, "find_nvcc", lambda: (_ for _ in ()).throw(OSError("boom")))
    c = diagnostics.check_nvcc()
    assert c.name == "nvcc" and not c.ok and "boom" in c.detail


def test_tensorrt_check_uses_the_project_import(monkeypatch):
    """doctor says what import_tensorrt says: too old is not ok, with the upgrade command; 10.3+ is ok."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    c = diagnostics.check_tensorrt()
    assert not c.ok and "8.6.1 is too old" in c.detail and "tensorrt>=10.3,<12" in c.fix
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.8.0"))
    c = diagnostics.check_tensorrt()
    assert c.ok and c.detail == "TensorRT 10.8.0"


def test_plugin_check_loads_the_library(monkeypatch, tmp_path, no_plugin):
    lib = tmp_path / plugins.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(lib))
    trt, calls = plugin_registry_module([PLUGIN_NAME])
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("rocket_deploy.runtime.trt.importing._LOGGER", None)
    c = diagnostics.check_trt_plugin()
    assert c.ok and f"{PLUGIN_NAME} registered (TensorRT 10.3.0)" in c.detail and calls["load"] == [str(lib)]
    monkeypatch.setattr(plugins, "_LOADED_PLUGINS", {})
    trt_other, _ = plugin_registry_module(["SomethingElse"])
    trt.get_plugin_registry = trt_other.get_plugin_registry
    c = diagnostics.check_trt_plugin()
    assert not c.ok and "loading it failed" in c.detail and "rebuild it against TensorRT 10.3.0" in c.fix


def _fake_nvcc(folder, release: str):
    folder.mkdir(parents=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return nvcc


def test_nvcc_check_reports_the_nvcc_the_extension_build_uses(monkeypatch, tmp_path):
    """One nvcc finder: torch's CUDA_HOME (what torch.utils.cpp_extension compiles with) wins over another nvcc on
    PATH, and doctor reports exactly that one."""
    import torch.utils.cpp_extension as cpp_ext
    build_nvcc = _fake_nvcc(tmp_path / "cuda-torch" / "bin", "12.4")
    other = _fake_nvcc(tmp_path / "elsewhere", "11.8")
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", str(tmp_path / "cuda-torch"))
    monkeypatch.setenv("PATH", f"{other.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("PYTORCH_NVCC", raising=False)
    assert kernel_ext.find_nvcc() == str(build_nvcc)
    c = diagnostics.check_nvcc()
    assert c.ok and c.detail.startswith(f"{build_nvcc} (CUDA 12.4)")
    monkeypatch.setenv("PYTORCH_NVCC", str(other))        # the build's override is the build's nvcc
    assert kernel_ext.find_nvcc() == str(other)
    assert diagnostics.check_nvcc().detail.startswith(f"{other} (CUDA 11.8)")
    assert not hasattr(diagnostics, "_find_nvcc")


# ---- issue 13: the export / serve dependencies, the ORT custom-op library, the PyTorch wheel index ----------------
import importlib.util  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("cuda,index", [
    ("12.6", "cu126"), ("12.7", "cu126"), ("12.8", "cu128"), ("12.9", "cu129"), ("12.4", "cu124"),
    ("12.5", "cu124"), ("12.0", "cu118"), ("12.1", "cu121"), ("11.8", "cu118"), ("11.7", None), ("13.0", "cu130"),
    ("13.2", "cu130"), ((13, 1), "cu130"), ("14.0", "cu130"), ("10.2", None), ("garbage", None), (None, None),
])
def test_pytorch_wheel_index(cuda, index):
    got = diagnostics.pytorch_wheel_index(cuda)
    assert got == (None if index is None else f"https://download.pytorch.org/whl/{index}")


def test_parse_cuda_version():
    smi = "| NVIDIA-SMI 560.35.03    Driver Version: 560.35.03    CUDA Version: 12.6     |"
    assert diagnostics.parse_cuda_version(smi) == (12, 6)
    assert diagnostics.parse_cuda_version("Cuda compilation tools, release 13.0, V13.0.48") == (13, 0)
    assert diagnostics.parse_cuda_version("12.4") == (12, 4) and diagnostics.parse_cuda_version("") is None


def test_torch_wheel_check_suggests_the_matching_index(monkeypatch):
    import torch
    monkeypatch.setattr(diagnostics, "found_cuda", lambda: ((12, 6), "the driver (nvidia-smi)"))
    monkeypatch.setattr(torch.version, "cuda", None)
    c = diagnostics.check_torch_wheel()
    assert not c.ok and "CPU-only" in c.detail and "--index-url https://download.pytorch.org/whl/cu126" in c.fix
    assert "cu126" in diagnostics.check_cuda().fix                         # the cuda check's fix is the same one
    monkeypatch.setattr(torch.version, "cuda", "12.8")                     # wheel newer than the driver
    c = diagnostics.check_torch_wheel()
    assert not c.ok and "newer than the driver supports" in c.detail and "cu126" in c.fix
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    c = diagnostics.check_torch_wheel()
    assert c.ok and "CUDA 12.4" in c.detail and "cu126" in c.detail
    monkeypatch.setattr(diagnostics, "found_cuda", lambda: (None, ""))     # no driver, no toolkit: CPU is right
    assert diagnostics.check_torch_wheel().ok


def test_found_cuda_prefers_the_driver(monkeypatch):
    monkeypatch.setattr(diagnostics, "driver_cuda_version", lambda: (12, 8))
    monkeypatch.setattr(diagnostics, "nvcc_cuda_version", lambda: (12, 4))
    assert diagnostics.found_cuda() == ((12, 8), "the driver (nvidia-smi)")
    monkeypatch.setattr(diagnostics, "driver_cuda_version", lambda: None)
    assert diagnostics.found_cuda() == ((12, 4), "the toolkit (nvcc)")


def test_package_checks(monkeypatch):
    by_name = {c.name: c for c in diagnostics.run_checks()}
    for name in ("transformers", "onnxscript", "onnx-ir"):
        assert by_name[name].ok and by_name[name].required
    for name in ("onnxruntime-genai", "serve extra", "ORT custom-op library", "torch CUDA wheel"):
        assert not by_name[name].required
    real = importlib.util.find_spec
    gone = ("sse_starlette", "onnxruntime_genai", "onnxscript")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in gone else real(n, *a))
    c = diagnostics.check_serve_extra()
    assert not c.ok and "missing sse-starlette" in c.detail and c.fix == "pip install 'rocket-deploy[serve]'"
    c = diagnostics.check_ort_genai()
    assert not c.ok and c.fix == "pip install onnxruntime-genai"
    c = diagnostics.check_onnxscript()
    assert not c.ok and c.required and "onnxscript" in c.fix


def test_ort_custom_op_check_never_builds(monkeypatch, tmp_path):
    from rocket_deploy.runtime import ort_custom_ops as oc
    lib = tmp_path / oc.LIB_NAME
    lib.write_bytes(b"x")
    monkeypatch.setenv("ROCKET_ORT_OPS_LIB", str(lib))
    c = diagnostics.check_ort_custom_ops()
    assert c.ok and str(lib) in c.detail
    monkeypatch.setenv("ROCKET_ORT_OPS_LIB", str(tmp_path / "missing.so"))
    c = diagnostics.check_ort_custom_ops()
    assert not c.ok and "missing.so" in c.detail and "make ort-ops" in c.fix
    monkeypatch.delenv("ROCKET_ORT_OPS_LIB")
    calls = []
    monkeypatch.setattr(oc, "library_path", lambda build=True: calls.append(build) or str(tmp_path / "no" / "lib.so"))
    c = diagnostics.check_ort_custom_ops()
    assert calls == [False] and not c.ok and "not built yet" in c.detail and c.fix == "make ort-ops"
