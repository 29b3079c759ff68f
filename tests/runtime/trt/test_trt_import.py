"""The project's one ``import tensorrt`` (runtime/trt/importing.py): a clear one-line error with the fix when TensorRT
is missing, broken or too old, and the build / engine entry points failing with it before touching anything."""
from __future__ import annotations

import sys
import types

import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from fake_tensorrt import no_tensorrt  # noqa: F401 -- fixture

from rocket_deploy.runtime.trt import MIN_TENSORRT, ShapeRanges, TensorRTUnavailable, build_engine, import_tensorrt
from rocket_deploy.runtime.trt.importing import version_tuple


def test_missing_tensorrt_message(no_tensorrt):
    with pytest.raises(TensorRTUnavailable) as info:
        import_tensorrt()
    e = info.value
    assert isinstance(e, ImportError) and "\n" not in str(e)
    assert str(e).startswith("TensorRT is not installed") and "pip install 'rocket-deploy[tensorrt]'" in str(e)
    assert "JetPack" in e.fix and e.reason in str(e) and e.fix in str(e)


class _BrokenFinder:
    """A meta-path finder that fails the way a tensorrt wheel without its CUDA libraries does."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file:\nNo such file or directory")
        return None


def test_broken_tensorrt_message(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenFinder(), *sys.meta_path])
    with pytest.raises(TensorRTUnavailable, match=r"installed but does not import \(OSError: libnvinfer\.so\.10: "
                                                  r"cannot open shared object file: No such file") as info:
        import_tensorrt()
    assert "\n" not in str(info.value) and "reinstall" in info.value.fix


@pytest.mark.parametrize("version", ["8.6.1", "10.2.0", ""])
def test_old_tensorrt_is_refused(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    with pytest.raises(TensorRTUnavailable, match=r"is too old: rocket-deploy needs >= 10\.3; pip install -U "
                                                  r"'tensorrt>=10\.3,<12'"):
        import_tensorrt()


@pytest.mark.parametrize("version", ["10.3.0", "10.13.2.6", "11.0.0"])
def test_supported_tensorrt_is_returned(monkeypatch, version):
    fake = types.SimpleNamespace(__version__=version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt() is fake


def test_version_tuple():
    assert version_tuple("10.8.0.43") == (10, 8, 0, 43) and version_tuple("10.3.0a1") == (10, 3, 0)
    assert version_tuple("") == () and version_tuple("x") == () and MIN_TENSORRT == (10, 3)


def test_build_engine_without_tensorrt(decoder_onnx, tmp_path, no_tensorrt):
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"))
    assert not (tmp_path / "m.plan").exists()


def test_open_engine_plan_without_tensorrt(tmp_path, no_tensorrt):
    from rocket_deploy.runtime import open_engine
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0" * 16)
    with pytest.raises(TensorRTUnavailable, match="pip install 'rocket-deploy\\[tensorrt\\]'"):
        open_engine(plan)
