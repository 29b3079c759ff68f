"""build_engine (runtime/trt/builder.py, plan_file.py) against the fake TensorRT builder: what the builder is asked
to do, the plan and its sidecar, timing caches, parser / builder failures, the plugin requirement, the logger and
the progress monitor. No TensorRT."""
from __future__ import annotations

import types

import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import rocket_layer_onnx
from fake_tensorrt import fake_build, no_plugin  # noqa: F401 -- fixtures
from fake_tensorrt import plugin_registry_module

from rocket_deploy.onnx_contract import PLUGIN_NAME
from rocket_deploy.runtime.trt import (PluginLibraryNotFound, ShapeRanges, atomic_write_bytes, build_engine,
                                       format_parser_errors, get_logger, read_plan_metadata)
from rocket_deploy.runtime.trt import plugins
from rocket_deploy.runtime.trt.builder import _make_progress_monitor
from rocket_deploy.runtime.trt.importing import recent_errors


def test_build_engine_orchestration_with_fake_builder(fake_build, decoder_onnx, tmp_path):
    fb = fake_build()
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"OLD")
    ranges = ShapeRanges.parse(batch="1:1:4", seq="1:128:512", max_context=2048)
    plan = build_engine(decoder_onnx, tmp_path / "out" / "model.plan", ranges, timing_cache=cache,
                        workspace_gb=2, builder_optimization_level=1, progress=True)
    assert plan.read_bytes() == b"SERIALIZED-PLAN"
    assert fb.calls["flags"] == 1 << 2                       # strongly typed
    assert fb.calls["pool"] == ("WORKSPACE", 2 << 30) and fb.calls["opt_level"] == 1
    assert fb.calls["monitor"] is not None
    assert fb.calls["set_shape"] == dict(ranges.profile(decoder_onnx))
    assert fb.calls["cache_in"] == b"OLD" and cache.read_bytes() == b"CACHE+OLD"
    meta = read_plan_metadata(plan)
    assert meta["max_context"] == 2048 and meta["decoder"] and meta["tensorrt_version"] == "10.3.0"
    assert meta["profile"]["attention_mask"] == [[1, 1], [1, 1152], [4, 2559]] and meta["uses_plugin"] is False
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_build_engine_mismatched_timing_cache_starts_fresh(fake_build, decoder_onnx, tmp_path, capsys):
    fake_build()
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"BAD")
    build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), timing_cache=cache,
                 progress=False)
    assert "does not match" in capsys.readouterr().err and cache.read_bytes() == b"CACHE+"


def test_build_engine_parser_and_builder_failures(fake_build, decoder_onnx, tmp_path):
    err = types.SimpleNamespace(node=lambda: 3, node_name=lambda: "/layers.0/Gather", node_operator=lambda: "Gather",
                                desc=lambda: "bad indices", code=lambda: "INVALID_NODE")
    fake_build(parse_ok=False, parser_errors=[err])
    with pytest.raises(RuntimeError, match=r"rejected .* \(1 error\(s\)\):\n  \[0\] node 3 '/layers.0/Gather' "
                                           r"\(Gather\): bad indices"):
        build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), progress=False)
    fake_build(build_ok=False)
    with pytest.raises(RuntimeError, match="could not build an engine"):
        build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), progress=False)
    assert not (tmp_path / "m.plan").exists()


def test_build_engine_needs_the_plugin_for_rocket_graphs(fake_build, tmp_path):
    path, _ = rocket_layer_onnx(tmp_path / "r.onnx")     # export first: torch.export looks for a real tensorrt
    fake_build()
    d_in = 32
    with pytest.raises(PluginLibraryNotFound, match="cmake -S plugins_trt"):
        build_engine(path, tmp_path / "r.plan", ShapeRanges(overrides={"x": ((1, d_in), (4, d_in), (8, d_in))}))
    assert not (tmp_path / "r.plan").exists()


def test_build_engine_loads_the_plugin_for_rocket_graphs(fake_build, monkeypatch, tmp_path):
    """A graph with the plugin's op: the library is loaded into the registry before parsing and the sidecar says so;
    no progress monitor when progress is off."""
    path, _ = rocket_layer_onnx(tmp_path / "r.onnx")
    fb = fake_build()
    registry, calls = plugin_registry_module([PLUGIN_NAME])
    fb.module.get_plugin_registry, fb.module.init_libnvinfer_plugins = (registry.get_plugin_registry,
                                                                        registry.init_libnvinfer_plugins)
    lib = tmp_path / "plugins" / plugins.PLUGIN_FILENAME
    lib.parent.mkdir()
    lib.write_bytes(b"x")
    monkeypatch.setenv(plugins.PLUGIN_ENV, str(lib))
    ranges = ShapeRanges(overrides={"x": ((1, 32), (4, 32), (8, 32))})
    plan = build_engine(path, tmp_path / "r.plan", ranges, progress=False)
    assert calls["load"] == [str(lib.resolve())] and fb.calls["monitor"] is None
    assert fb.calls["set_shape"] == {"x": ((1, 32), (4, 32), (8, 32))}
    meta = read_plan_metadata(plan)
    assert meta["uses_plugin"] is True and meta["plugin_library"] == str(lib.resolve()) and not meta["decoder"]
    assert meta["max_context"] is None and meta["strongly_typed"] is True


def test_logger_and_progress_monitor(fake_build, capsys):
    fb = fake_build()
    logger = get_logger(fb.module)
    assert get_logger(fb.module) is logger                   # one per process
    logger.log(types.SimpleNamespace(name="ERROR"), "engine broke")
    logger.log(types.SimpleNamespace(name="INFO"), "chatter")
    assert "engine broke" in recent_errors(logger)
    mon = _make_progress_monitor(fb.module)
    mon.phase_start("Building engine", None, 3)
    mon.phase_start("Tactic search", "Building engine", 10)
    mon.phase_start("Kernel timing", "Tactic search", 5)         # depth 2: not printed
    assert mon.step_complete("Kernel timing", 0) is True
    mon.phase_finish("Kernel timing")
    mon.phase_finish("Tactic search")
    mon.phase_finish("Building engine")
    err = capsys.readouterr().err
    assert "[TensorRT ERROR] engine broke" in err and "chatter" not in err
    assert "[build] Building engine (3 steps)" in err and "  [build] Tactic search done in" in err
    assert "Kernel timing" not in err


def test_format_parser_errors_names_nodes():
    class Err:
        def __init__(self, node, name, op, desc):
            self._v = dict(node=node, node_name=name, node_operator=op, desc=desc,
                           code=types.SimpleNamespace(name="UNSUPPORTED_NODE"))

        def __getattr__(self, k):
            if k in self.__dict__.get("_v", {}):
                return lambda: self._v[k]
            raise AttributeError(k)

    text = format_parser_errors([Err(7, f"/model/layers.0/mlp/down/{PLUGIN_NAME}", PLUGIN_NAME,
                                     f"No importer registered for op: {PLUGIN_NAME}"),
                                 Err(-1, "", "", "graph has no outputs")])
    line0, line1 = text.splitlines()
    assert "node 7" in line0 and f"'/model/layers.0/mlp/down/{PLUGIN_NAME}'" in line0
    assert "UNSUPPORTED_NODE" in line0 and "plugin library" in line0 and "cmake -S plugins_trt" in line0
    assert line1.startswith("  [1] graph: graph has no outputs")


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "sub" / "model.plan"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.plan"]  # no temp files left

    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"  # untouched on failure
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.plan"]
