"""Plugin library discovery and loading (runtime/trt/plugins.py) against a fake plugin registry, and the detection of
the plugin's op in a graph. No TensorRT."""
from __future__ import annotations

import types

import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import rocket_layer_onnx
from fake_tensorrt import no_plugin  # noqa: F401 -- fixture
from fake_tensorrt import plugin_registry_module

from rocket_deploy.onnx_contract import PLUGIN_NAME
from rocket_deploy.runtime.trt import onnx_uses_op, plugins


def test_find_plugin_library_env_override(monkeypatch, tmp_path, no_plugin):
    lib = tmp_path / "custom" / plugins.PLUGIN_FILENAME
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(lib))
    assert plugins.find_plugin_library() == lib.resolve()
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(plugins.PluginLibraryNotFound, match=r"ROCKET_TRT_PLUGIN points to .*missing\.so"):
        plugins.find_plugin_library()


def test_find_plugin_library_search_order(tmp_path, no_plugin):
    assert plugins.find_plugin_library() is None
    shipped = tmp_path / "src" / "pkg" / "runtime" / plugins.PLUGIN_FILENAME
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"x")
    assert plugins.find_plugin_library() == shipped.resolve()
    built = tmp_path / "src" / "plugins_trt" / "build-jetson" / plugins.PLUGIN_FILENAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"x")
    assert plugins.find_plugin_library() == built.resolve()   # the source checkout's build wins


def test_search_roots_are_the_checkout_and_the_runtime_package():
    """Unpatched: the checkout root holds plugins_trt/, the package folder is the runtime package itself."""
    from rocket_deploy import runtime
    assert plugins._PACKAGE_DIR == type(plugins._PACKAGE_DIR)(runtime.__file__).resolve().parent
    assert (plugins._SOURCE_ROOT / "plugins_trt" / "CMakeLists.txt").is_file()


def test_load_plugins_missing_library_message(no_plugin):
    with pytest.raises(plugins.PluginLibraryNotFound) as info:
        plugins.load_plugins(types.SimpleNamespace(), logger=None)
    msg = str(info.value)
    assert "cmake -S plugins_trt -B plugins_trt/build -DTensorRT_ROOT=" in msg
    assert "cmake --build plugins_trt/build" in msg and "ROCKET_TRT_PLUGIN" in msg and PLUGIN_NAME in msg


def test_load_plugins_with_registry(monkeypatch, tmp_path, no_plugin):
    lib = tmp_path / plugins.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(lib))
    trt, calls = plugin_registry_module([PLUGIN_NAME, "GroupNormalizationPlugin"])
    assert plugins.load_plugins(trt, logger=object()) == lib.resolve()
    assert calls == {"load": [str(lib.resolve())], "init": 1}
    plugins.load_plugins(trt, logger=object())         # loaded once per process
    assert len(calls["load"]) == 1
    assert plugins.registered_creator_names(trt) == {PLUGIN_NAME, "GroupNormalizationPlugin"}


@pytest.mark.parametrize("creators", [["SomethingElse"], []])
def test_load_plugins_without_the_rocket_creator(tmp_path, no_plugin, creators):
    lib = tmp_path / plugins.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    trt, _ = plugin_registry_module(creators)
    with pytest.raises(RuntimeError, match=f"registers no '{PLUGIN_NAME}' plugin creator"):
        plugins.load_plugins(trt, logger=object(), path=lib)
    assert str(lib.resolve()) not in plugins._LOADED_PLUGINS


def test_load_plugins_unloadable_file(tmp_path, no_plugin):
    lib = tmp_path / plugins.PLUGIN_FILENAME
    lib.write_bytes(b"not a shared object")
    trt, _ = plugin_registry_module([PLUGIN_NAME], load_result=None)   # registry refuses; dlopen fails too
    with pytest.raises(RuntimeError, match="could not load the TensorRT plugin library .* rebuild it: cmake"):
        plugins.load_plugins(trt, logger=object(), path=lib)


def test_onnx_uses_op(tmp_path, decoder_onnx):
    assert not onnx_uses_op(decoder_onnx)
    path, _ = rocket_layer_onnx(tmp_path / "r.onnx")
    assert onnx_uses_op(path)
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        onnx_uses_op(tmp_path / "missing.onnx")
