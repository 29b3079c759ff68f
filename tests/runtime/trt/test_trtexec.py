"""The trtexec command line of ``rocket-deploy build --dry-run`` (runtime/trt/trtexec.py): a pure function of the
profile, paths and builder settings. No TensorRT, no ONNX file."""
from __future__ import annotations

import shlex

import pytest

from rocket_deploy.runtime.trt import ProfileShape
from rocket_deploy.runtime.trt.profiles import parse_shape_override
from rocket_deploy.runtime.trt.trtexec import dims_text, format_command, shapes_arg, trtexec_argv

PROFILE = {"input_ids": ProfileShape((1, 1), (1, 4), (2, 8)),
           "attention_mask": ProfileShape((1, 1), (1, 12), (2, 23)),
           "past_key_values.0.key": ProfileShape((1, 2, 0, 8), (1, 2, 8, 8), (2, 2, 15, 8))}


def test_shapes_args_follow_the_profile_in_graph_order():
    assert dims_text((1, 2, 0, 8)) == "1x2x0x8"
    assert shapes_arg(PROFILE, "min") == "input_ids:1x1,attention_mask:1x1,past_key_values.0.key:1x2x0x8"
    assert shapes_arg(PROFILE, "opt") == "input_ids:1x4,attention_mask:1x12,past_key_values.0.key:1x2x8x8"
    assert shapes_arg(PROFILE, "max") == "input_ids:2x8,attention_mask:2x23,past_key_values.0.key:2x2x15x8"
    assert shapes_arg({"a:b": ProfileShape((1,), (2,), (3,))}, "min") == "'a:b':1"   # trtexec's quoting
    with pytest.raises(ValueError, match="which"):
        shapes_arg(PROFILE, "mid")


def test_argv_mirrors_the_builder():
    argv = trtexec_argv("m.onnx", "m.plan", PROFILE, plugin_library="/p/librocket_trt_plugins.so",
                        builder_optimization_level=5, workspace_gb=1.5, timing_cache="t.cache")
    assert argv[:3] == ["trtexec", "--onnx=m.onnx", "--saveEngine=m.plan"]
    assert f"--minShapes={shapes_arg(PROFILE, 'min')}" in argv and f"--maxShapes={shapes_arg(PROFILE, 'max')}" in argv
    assert "--stronglyTyped" in argv and "--fp16" not in argv and "--bf16" not in argv   # precisions from the graph
    assert "--builderOptimizationLevel=5" in argv and "--memPoolSize=workspace:1536M" in argv
    assert "--timingCacheFile=t.cache" in argv and argv[-1] == "--dynamicPlugins=/p/librocket_trt_plugins.so"
    static = trtexec_argv("m.onnx", "m.plan", PROFILE, plugin_library="/p/l.so", plugin_mode="static")
    assert static[-1] == "--staticPlugins=/p/l.so"


def test_argv_defaults_and_errors():
    argv = trtexec_argv("dir with space/m.onnx", "m.plan", PROFILE)
    assert not any(a.startswith(("--memPoolSize", "--timingCacheFile", "--dynamicPlugins", "--staticPlugins"))
                   for a in argv)
    assert "--builderOptimizationLevel=3" in argv
    assert shlex.split(format_command(argv)) == argv          # one paste-able, correctly quoted line
    for kw, needle in ((dict(plugin_mode="both"), "plugin_mode"), (dict(builder_optimization_level=6), "0..5"),
                       (dict(workspace_gb=0), "workspace")):
        with pytest.raises(ValueError, match=needle):
            trtexec_argv("m.onnx", "m.plan", PROFILE, **kw)


@pytest.mark.parametrize("text,expected", [
    ("input_ids:1x1,4x64,8x512", ("input_ids", ((1, 1), (4, 64), (8, 512)))),
    ("x:2x32", ("x", ((2, 32), (2, 32), (2, 32)))),
    ("past_key_values.0.key:1x2x0x8,1X2X8X8,2x2x15x8", ("past_key_values.0.key", ((1, 2, 0, 8), (1, 2, 8, 8),
                                                                                   (2, 2, 15, 8)))),
])
def test_parse_shape_override(text, expected):
    assert parse_shape_override(text) == expected


@pytest.mark.parametrize("text,needle", [("input_ids", "NAME:MIN,OPT,MAX"), (":1x1", "NAME:MIN,OPT,MAX"),
                                         ("a:1x1,2x2", "has 2 shapes"), ("a:1xq", "integers joined by 'x'")])
def test_parse_shape_override_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_shape_override(text)
