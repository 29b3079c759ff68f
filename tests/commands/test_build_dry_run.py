"""``rocket-deploy build --dry-run`` prints the trtexec command our builder corresponds to, without TensorRT, and
``--shape`` overrides one input's profile (validated against the graph's inputs)."""
from __future__ import annotations

import shlex

from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import rocket_layer_onnx
from click.testing import CliRunner
from fake_tensorrt import no_plugin, no_tensorrt  # noqa: F401 -- fixtures

from rocket_deploy.runtime.trt import ShapeRanges, read_onnx_inputs
from rocket_deploy.runtime.trt.trtexec import shapes_arg


def _cli(*args):
    from rocket_deploy.cli import main
    return CliRunner().invoke(main, list(args))


def _trtexec_line(output: str) -> list[str]:
    lines = output.splitlines()
    return shlex.split(lines[lines.index("equivalent trtexec command:") + 1])


def test_dry_run_prints_the_trtexec_command(decoder_onnx, tmp_path, no_tensorrt):
    plan = tmp_path / "m.plan"
    res = _cli("build", str(decoder_onnx), "--out", str(plan), "--batch", "1:1:2", "--seq", "1:4:8",
               "--max-context", "16", "--opt-level", "4", "--workspace-gb", "2", "--dry-run")
    assert res.exit_code == 0, res.output
    argv = _trtexec_line(res.output)
    profile = ShapeRanges.parse("1:1:2", "1:4:8", 16).profile(decoder_onnx)     # what build_engine would use
    assert argv[:3] == ["trtexec", f"--onnx={decoder_onnx}", f"--saveEngine={plan}"]
    for which, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        assert f"{flag}={shapes_arg(profile, which)}" in argv
    assert "past_key_values.0.key:2x2x15x8" in shapes_arg(profile, "max")
    assert {"--stronglyTyped", "--builderOptimizationLevel=4", "--memPoolSize=workspace:2048M"} <= set(argv)
    assert not any("Plugins=" in a for a in argv)                   # this graph has no RocketSparseVMatMul
    assert not plan.exists()


def test_shape_override(decoder_onnx, no_tensorrt):
    res = _cli("build", str(decoder_onnx), "--batch", "1:2:4", "--seq", "1:4:8", "--max-context", "16",
               "--shape", "input_ids:1x1,2x3,4x8", "--shape", "position_ids:1x1,2x3,4x8", "--dry-run")
    assert res.exit_code == 0, res.output
    argv = _trtexec_line(res.output)
    assert next(a for a in argv if a.startswith("--optShapes=")).startswith("--optShapes=input_ids:2x3,")
    assert "position_ids:4x8" in next(a for a in argv if a.startswith("--maxShapes="))


def test_shape_errors(decoder_onnx, no_tensorrt):
    names = [i.name for i in read_onnx_inputs(decoder_onnx)]
    res = _cli("build", str(decoder_onnx), "--shape", "input_idz:1x1,2x2,4x4", "--dry-run")
    assert res.exit_code == 2 and "--shape" in res.output and "'input_idz' is not an input" in res.output
    assert ", ".join(names) in " ".join(res.output.split())          # the one-line error lists the inputs
    for bad, needle in (("input_ids:1x1,2x2", "has 2 shapes"), ("input_ids:4x4,2x2,1x1", "min <= opt <= max"),
                        ("input_ids:1x1x1,2x2x2,4x4x4", "rank 3")):
        res = _cli("build", str(decoder_onnx), "--shape", bad, "--dry-run")
        assert res.exit_code in (1, 2) and needle in res.output and "Traceback" not in res.output, res.output
    res = _cli("build", str(decoder_onnx), "--shape", "input_ids:1x1", "--shape", "input_ids:2x2", "--dry-run")
    assert res.exit_code == 2 and "given twice" in res.output


def test_dry_run_names_the_plugin_library(tmp_path, no_tensorrt, no_plugin):
    onnx_path, _ = rocket_layer_onnx(tmp_path / "layer.onnx")
    res = _cli("build", str(onnx_path), "--shape", "x:1x32,4x32,8x32", "--dry-run")
    assert res.exit_code == 0, res.output
    argv = _trtexec_line(res.output)
    assert argv[-1].startswith("--dynamicPlugins=") and argv[-1].endswith("plugins_trt/build/librocket_trt_plugins.so")
    assert "not built yet" in res.output and "cmake -S plugins_trt" in res.output
    assert "--minShapes=x:1x32" in argv and "--maxShapes=x:8x32" in argv
    lib = tmp_path / "librocket_trt_plugins.so"
    lib.write_bytes(b"x")
    res = _cli("build", str(onnx_path), "--shape", "x:2x32", "--plugin-library", str(lib), "--dry-run")
    assert res.exit_code == 0, res.output
    assert _trtexec_line(res.output)[-1] == f"--dynamicPlugins={lib}"
