"""TensorRT backend: profile logic, plugin discovery, the build / doctor commands (no TensorRT needed), and, where
``import tensorrt`` works on a CUDA machine, real engine builds and runs."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from rocket_deploy.runtime import diagnostics
from rocket_deploy.runtime import trt_backend as tb
from rocket_deploy.runtime.trt_backend import DimRange, GraphInput, ShapeRanges

KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 2, 8, 32, 2


# ================================================================================================================
# Tiny ONNX models
# ================================================================================================================
def _model(nodes, inputs, outputs, inits, opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _decoder_weights(seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, KV_HEADS * HEAD_DIM)).astype(np.float32)
    w = rng.standard_normal((KV_HEADS * HEAD_DIM, VOCAB)).astype(np.float32)
    return emb, w


def tiny_decoder(path: Path, batch_dim="batch", layers=LAYERS) -> Path:
    """A decoder with the Optimum KV I/O names. logits = emb(ids) @ W + position_ids + sum(mask) + sum(present.0.key);
    present.i.key = concat(past, kv), present.i.value = concat(past, 2 kv) with kv = emb(ids) as [b, h, s, d]."""
    emb, w = _decoder_weights()
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, [batch_dim, "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, [batch_dim, "total"]),
              helper.make_tensor_value_info("position_ids", i64, [batch_dim, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f, [batch_dim, "seq", VOCAB])]
    inits = [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "kv_shape"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax_last"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax123"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Reshape", ["emb", "kv_shape"], ["kv4"]),
             helper.make_node("Transpose", ["kv4"], ["kv"], perm=[0, 2, 1, 3]),
             helper.make_node("Mul", ["kv", "two"], ["kv2"])]
    for i in range(layers):
        for kind, src in (("key", "kv"), ("value", "kv2")):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f,
                                                        [batch_dim, KV_HEADS, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f,
                                                         [batch_dim, KV_HEADS, "total", HEAD_DIM]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.{kind}", src], [f"present.{i}.{kind}"],
                                          axis=2))
    nodes += [helper.make_node("MatMul", ["emb", "W"], ["proj"]),
              helper.make_node("Cast", ["position_ids"], ["pos_f"], to=f),
              helper.make_node("Unsqueeze", ["pos_f", "ax_last"], ["pos3"]),
              helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
              helper.make_node("ReduceSum", ["mask_f", "ax1"], ["mask_sum"], keepdims=1),
              helper.make_node("Unsqueeze", ["mask_sum", "ax_last"], ["mask3"]),
              helper.make_node("ReduceSum", ["present.0.key", "ax123"], ["key_sum"], keepdims=0),
              helper.make_node("Unsqueeze", ["key_sum", "ax12"], ["key3"]),
              helper.make_node("Add", ["proj", "pos3"], ["l1"]),
              helper.make_node("Add", ["l1", "mask3"], ["l2"]),
              helper.make_node("Add", ["l2", "key3"], ["logits"])]
    model = _model(nodes, inputs, outputs, inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference_decoder(ids, mask, pos, past):
    """numpy twin of :func:`tiny_decoder`. ``past``: {name: array} or None."""
    emb, w = _decoder_weights()
    b, s = ids.shape
    e = emb[ids]                                                       # [b, s, h*d]
    kv = e.reshape(b, s, KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    present = {}
    for i in range(LAYERS):
        for kind, src in (("key", kv), ("value", 2 * kv)):
            p = past[f"past_key_values.{i}.{kind}"] if past else np.zeros((b, KV_HEADS, 0, HEAD_DIM), np.float32)
            present[f"present.{i}.{kind}"] = np.concatenate([p, src], axis=2)
    logits = (e @ w + pos[..., None].astype(np.float32) + mask.sum(1).astype(np.float32)[:, None, None]
              + present["present.0.key"].sum(axis=(1, 2, 3))[:, None, None])
    return logits.astype(np.float32), present


def tiny_encoder(path: Path) -> Path:
    i64, f = TensorProto.INT64, TensorProto.FLOAT
    emb = np.random.default_rng(1).standard_normal((VOCAB, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=f),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["last_hidden_state"])]
    model = _model(nodes,
                   [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
                    helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"])],
                   [helper.make_tensor_value_info("last_hidden_state", f, ["batch", "seq", 16])],
                   [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_matmul(path: Path, weight: np.ndarray) -> Path:
    f = TensorProto.FLOAT
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [helper.make_tensor_value_info("x", f, ["batch", "rows", weight.shape[0]])],
                   [helper.make_tensor_value_info("y", f, ["batch", "rows", weight.shape[1]])],
                   [numpy_helper.from_array(weight, "W")])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def decoder_onnx(tmp_path):
    return tiny_decoder(tmp_path / "model.onnx")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_plugin(monkeypatch, tmp_path):
    """No plugin library anywhere: env unset, search roots pointed at empty folders."""
    monkeypatch.delenv(tb.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(tb, "_SOURCE_ROOT", tmp_path / "src")
    monkeypatch.setattr(tb, "_PACKAGE_DIR", tmp_path / "src" / "pkg" / "runtime")
    monkeypatch.setattr(tb, "_LOADED_PLUGINS", {})


# ================================================================================================================
# The fixture model itself is right (checked with ONNX Runtime, CPU)
# ================================================================================================================
def test_tiny_decoder_matches_reference_in_onnxruntime(decoder_onnx):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(decoder_onnx), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 5, 7], [1, 2, 4]], np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    pos = tb.position_ids_from_mask(mask, 3)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32)  # empty past
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    ref_logits, ref_present = reference_decoder(ids, mask, pos, None)
    np.testing.assert_allclose(outs["logits"], ref_logits, rtol=1e-5, atol=1e-4)
    # one decode step on top of that past
    past = {n.replace("present.", "past_key_values."): v for n, v in ref_present.items()}
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    ids2 = np.array([[9], [11]], np.int64)
    feeds2 = {"input_ids": ids2, "attention_mask": mask2, "position_ids": tb.position_ids_from_mask(mask2, 1), **past}
    outs2 = dict(zip(names, sess.run(None, feeds2)))
    ref2, _ = reference_decoder(ids2, mask2, feeds2["position_ids"], past)
    np.testing.assert_allclose(outs2["logits"], ref2, rtol=1e-5, atol=1e-4)
    assert outs2["present.1.value"].shape == (2, KV_HEADS, 4, HEAD_DIM)


# ================================================================================================================
# DimRange / ShapeRanges
# ================================================================================================================
@pytest.mark.parametrize("text,expected", [("4", (4, 4, 4)), ("1:8", (1, 8, 8)), ("1:128:512", (1, 128, 512)),
                                           (" 2:2:2 ", (2, 2, 2)), (3, (3, 3, 3))])
def test_dimrange_parse(text, expected):
    r = DimRange.parse(text)
    assert (r.min, r.opt, r.max) == expected


@pytest.mark.parametrize("text,needle", [("8:1:4", "min <= opt <= max"), ("4:2", "min <= opt <= max"),
                                         ("a:b:c", "MIN:OPT:MAX"), ("1:2:3:4", "4 parts"), ("-1:1:1", "negative"),
                                         ("", "MIN:OPT:MAX")])
def test_dimrange_parse_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        DimRange.parse(text, "batch range")


def test_read_onnx_inputs_skips_initializers(tmp_path):
    path = tiny_decoder(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    # older exporters list initializers among the graph inputs: they are not real inputs
    model.graph.input.append(helper.make_tensor_value_info("E", TensorProto.FLOAT, [VOCAB, 16]))
    onnx.save(model, str(path))
    inputs = tb.read_onnx_inputs(path)
    names = [i.name for i in inputs]
    assert "E" not in names
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(names) == 3 + 2 * LAYERS
    past = inputs[3]
    assert past == GraphInput("past_key_values.0.key", "float32", ("batch", KV_HEADS, "past", HEAD_DIM))


def test_profile_for_every_decoder_input(decoder_onnx):
    ranges = ShapeRanges.parse(batch="1:1:4", seq="1:128:512", max_context=2048)
    prof = ranges.profile(decoder_onnx)
    assert set(prof) == {"input_ids", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")}
    assert prof["input_ids"] == ((1, 1), (1, 128), (4, 512))
    assert prof["position_ids"] == prof["input_ids"]
    # past: 0 (empty cache) .. max_context - seq.min; opt half the context
    for i in range(LAYERS):
        for k in ("key", "value"):
            assert prof[f"past_key_values.{i}.{k}"] == ((1, KV_HEADS, 0, HEAD_DIM), (1, KV_HEADS, 1024, HEAD_DIM),
                                                        (4, KV_HEADS, 2047, HEAD_DIM))
    # mask = past + seq at every corner
    assert prof["attention_mask"] == ((1, 1), (1, 1024 + 128), (4, 2047 + 512))
    for corner in range(3):
        assert prof["attention_mask"][corner][1] == \
            prof["past_key_values.0.key"][corner][2] + prof["input_ids"][corner][1]


def test_profile_defaults_and_past_opt(decoder_onnx):
    r = ShapeRanges.parse(seq="1:16:64")            # max context defaults to the seq max
    assert r.context == 64 and r.past == DimRange(0, 32, 63)
    prof = r.profile(decoder_onnx)
    assert prof["attention_mask"] == ((1, 1), (1, 48), (1, 127))
    r2 = ShapeRanges.parse(seq="1:1:1", max_context=512, past_opt=100)
    prof2 = r2.profile(decoder_onnx)
    assert prof2["past_key_values.1.value"].opt == (1, KV_HEADS, 100, HEAD_DIM)
    assert prof2["attention_mask"] == ((1, 1), (1, 101), (1, 512))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(batch="0:1:2"), "batch size must be >= 1"),
    (dict(seq="0:4:8"), "new tokens must be >= 1"),
    (dict(seq="1:128:512", max_context=256), "shorter than the longest sequence"),
    (dict(seq="1:4:8", max_context=16, past_opt=99), r"past opt 99 must be in \[0, 15\]"),
    (dict(seq="1:4:8", max_context=16, past_opt=-1), "past opt"),
    (dict(batch="4:1:8"), "min <= opt <= max"),
])
def test_shape_range_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ShapeRanges.parse(**kwargs)


def test_profile_rejects_ranges_a_static_graph_cannot_take(tmp_path):
    path = tiny_decoder(tmp_path / "static.onnx", batch_dim=1)
    with pytest.raises(ValueError, match=r"fixed batch of 1 .* need 1\.\.4"):
        ShapeRanges.parse(batch="1:2:4").profile(path)
    prof = ShapeRanges.parse(batch="1").profile(path)  # fine with batch fixed to 1
    assert prof["input_ids"].max[0] == 1


def test_profile_encoder_mask_is_seq(tmp_path):
    prof = ShapeRanges.parse(batch="1:2:8", seq="1:64:128", max_context=4096).profile(tiny_encoder(tmp_path / "e.onnx"))
    assert prof == {"input_ids": ((1, 1), (2, 64), (8, 128)), "attention_mask": ((1, 1), (2, 64), (8, 128))}


def test_profile_unknown_inputs_need_overrides(tmp_path):
    path = tiny_matmul(tmp_path / "mm.onnx", np.ones((16, 8), np.float32))
    with pytest.raises(ValueError, match="cannot choose shapes for input 'x'.*overrides"):
        ShapeRanges().profile(path)
    r = ShapeRanges(overrides={"x": ((1, 1, 16), (2, 4, 16), (4, 8, 16))})
    assert r.profile(path) == {"x": ((1, 1, 16), (2, 4, 16), (4, 8, 16))}
    with pytest.raises(ValueError, match="fixed dim 2 of 16"):
        ShapeRanges(overrides={"x": ((1, 1, 8), (1, 1, 8), (1, 1, 8))}).profile(path)
    with pytest.raises(ValueError, match="rank 2"):
        ShapeRanges(overrides={"x": ((1, 16), (1, 16), (1, 16))}).profile(path)
    with pytest.raises(ValueError, match="does not have: nope"):
        ShapeRanges(overrides={"nope": ((1,), (1,), (1,))}).profile(path)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRanges(overrides={"x": ((4, 1, 16), (1, 1, 16), (1, 1, 16))})


def test_profile_kv_heads_must_be_static():
    inputs = [GraphInput("input_ids", "int64", ("b", "s")),
              GraphInput("past_key_values.0.key", "float16", ("b", "heads", "p", 64))]
    with pytest.raises(ValueError, match="dynamic kv_heads"):
        ShapeRanges().profile(inputs)
    inputs[1] = GraphInput("past_key_values.0.key", "float16", ("b", 4, "p"))
    with pytest.raises(ValueError, match="rank 3"):
        ShapeRanges().profile(inputs)


def test_format_profile_table(decoder_onnx):
    text = tb.format_profile(ShapeRanges.parse(seq="1:4:8", max_context=16).profile(decoder_onnx))
    lines = text.splitlines()
    assert lines[0].split() == ["input", "min", "opt", "max"]
    assert any(line.split() == ["past_key_values.0.key", "1x2x0x8", "1x2x8x8", "1x2x15x8"] for line in lines)


# ================================================================================================================
# Host helpers
# ================================================================================================================
def test_position_ids_from_mask():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(tb.position_ids_from_mask(mask, 4), [[0, 1, 2, 3], [1, 1, 0, 1]])
    np.testing.assert_array_equal(tb.position_ids_from_mask(mask, 1), [[3], [1]])
    assert tb.position_ids_from_mask(mask, 2).dtype == np.int64


def test_check_profile_shapes_messages():
    prof = {"input_ids": ((1, 1), (1, 4), (2, 8)), "attention_mask": ((1, 1), (1, 12), (2, 23)),
            "past_key_values.0.key": ((1, 2, 0, 8), (1, 2, 8, 8), (2, 2, 15, 8))}
    tb.check_profile_shapes({"input_ids": (2, 8), "attention_mask": (2, 16)}, prof, max_context=16)
    with pytest.raises(ValueError, match=r"batch size 3 is outside the engine's range \[1, 2\] \(--batch\)"):
        tb.check_profile_shapes({"input_ids": (3, 1)}, prof)
    with pytest.raises(ValueError, match=r"9 new tokens per call .*\[1, 8\] \(--seq\)"):
        tb.check_profile_shapes({"input_ids": (1, 9)}, prof)
    with pytest.raises(ValueError, match=r"context of 17 tokens .* longer than the max the engine was built for "
                                         r"\(16; --max-context\)"):
        tb.check_profile_shapes({"input_ids": (1, 1), "attention_mask": (1, 17)}, prof, max_context=16)
    with pytest.raises(ValueError, match=r"past of 16 tokens .*\[0, 15\]"):
        tb.check_profile_shapes({"past_key_values.0.key": (1, 2, 16, 8)}, prof)
    with pytest.raises(ValueError, match="rank 3"):
        tb.check_profile_shapes({"input_ids": (1, 1, 1)}, prof)
    with pytest.raises(ValueError, match="rocket-deploy build"):
        tb.check_profile_shapes({"input_ids": (1, 9)}, prof)


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "sub" / "model.plan"
    tb.atomic_write_bytes(target, b"first")
    tb.atomic_write_bytes(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.plan"]  # no temp files left

    with pytest.raises(TypeError):
        tb.atomic_write_bytes(target, 12345)  # type: ignore[arg-type]
    assert target.read_bytes() == b"second"  # untouched on failure
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.plan"]


def test_format_parser_errors_names_nodes():
    class Err:
        def __init__(self, node, name, op, desc):
            self._v = dict(node=node, node_name=name, node_operator=op, desc=desc,
                           code=types.SimpleNamespace(name="UNSUPPORTED_NODE"))

        def __getattr__(self, k):
            if k in self.__dict__.get("_v", {}):
                return lambda: self._v[k]
            raise AttributeError(k)

    text = tb.format_parser_errors([Err(7, "/model/layers.0/mlp/down/RocketSparseVMatMul", tb.ROCKET_OP,
                                        "No importer registered for op: RocketSparseVMatMul"),
                                    Err(-1, "", "", "graph has no outputs")])
    line0, line1 = text.splitlines()
    assert "node 7" in line0 and "'/model/layers.0/mlp/down/RocketSparseVMatMul'" in line0
    assert "UNSUPPORTED_NODE" in line0 and "plugin library" in line0 and "cmake -S plugins_trt" in line0
    assert line1.startswith("  [1] graph: graph has no outputs")


def test_trt_dtype_to_torch():
    torch = pytest.importorskip("torch")
    assert tb.trt_dtype_to_torch("HALF") is torch.float16
    assert tb.trt_dtype_to_torch(types.SimpleNamespace(name="INT64")) is torch.int64
    assert tb.trt_dtype_to_torch("DataType.BF16") is torch.bfloat16
    with pytest.raises(TypeError, match="INT4"):
        tb.trt_dtype_to_torch("INT4")


def test_onnx_uses_op(tmp_path, decoder_onnx):
    assert not tb.onnx_uses_op(decoder_onnx)
    path = rocket_op_onnx(tmp_path / "r.onnx", *sparse_layer(16, 8, 4)[:2])
    assert tb.onnx_uses_op(path)


# ================================================================================================================
# Plugin discovery
# ================================================================================================================
def test_find_plugin_library_env_override(monkeypatch, tmp_path, no_plugin):
    lib = tmp_path / "custom" / "librocket_trt_plugins.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(tb.PLUGIN_ENV, str(lib))
    assert tb.find_plugin_library() == lib.resolve()
    monkeypatch.setenv(tb.PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(tb.PluginLibraryNotFound, match=r"ROCKET_TRT_PLUGIN points to .*missing\.so"):
        tb.find_plugin_library()


def test_find_plugin_library_search_order(tmp_path, no_plugin):
    assert tb.find_plugin_library() is None
    shipped = tmp_path / "src" / "pkg" / "runtime" / tb.PLUGIN_FILENAME
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"x")
    assert tb.find_plugin_library() == shipped.resolve()
    built = tmp_path / "src" / "plugins_trt" / "build-jetson" / tb.PLUGIN_FILENAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"x")
    assert tb.find_plugin_library() == built.resolve()   # the source checkout's build wins


def test_load_plugins_missing_library_message(no_plugin):
    fake_trt = types.SimpleNamespace()
    with pytest.raises(tb.PluginLibraryNotFound) as info:
        tb.load_plugins(fake_trt, logger=None)
    msg = str(info.value)
    assert "cmake -S plugins_trt -B plugins_trt/build -DTensorRT_ROOT=" in msg
    assert "cmake --build plugins_trt/build" in msg and "ROCKET_TRT_PLUGIN" in msg and tb.ROCKET_OP in msg


def _fake_trt(creators, load_result="handle"):
    calls = {"load": [], "init": 0}

    class Registry:
        @property
        def all_creators(self):
            return [types.SimpleNamespace(name=n) for n in creators]

        def load_library(self, path):
            calls["load"].append(path)
            return load_result

    reg = Registry()

    def init(logger, ns):
        calls["init"] += 1

    return types.SimpleNamespace(get_plugin_registry=lambda: reg, init_libnvinfer_plugins=init,
                                 __version__="10.3.0"), calls


def test_load_plugins_with_registry(monkeypatch, tmp_path, no_plugin):
    lib = tmp_path / tb.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    monkeypatch.setenv(tb.PLUGIN_ENV, str(lib))
    trt, calls = _fake_trt([tb.ROCKET_OP, "GroupNormalizationPlugin"])
    assert tb.load_plugins(trt, logger=object()) == lib.resolve()
    assert calls == {"load": [str(lib.resolve())], "init": 1}
    tb.load_plugins(trt, logger=object())         # loaded once per process
    assert len(calls["load"]) == 1


def test_load_plugins_without_the_rocket_creator(tmp_path, no_plugin):
    lib = tmp_path / tb.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    trt, _ = _fake_trt(["SomethingElse"])
    with pytest.raises(RuntimeError, match="registers no 'RocketSparseVMatMul' plugin creator"):
        tb.load_plugins(trt, logger=object(), path=lib)


def test_load_plugins_unloadable_file(tmp_path, no_plugin):
    lib = tmp_path / tb.PLUGIN_FILENAME
    lib.write_bytes(b"not a shared object")
    trt, _ = _fake_trt([tb.ROCKET_OP], load_result=None)   # registry refuses; dlopen fails too
    with pytest.raises(RuntimeError, match="could not load the TensorRT plugin library"):
        tb.load_plugins(trt, logger=object(), path=lib)


# ================================================================================================================
# Without TensorRT: clear errors, no tracebacks
# ================================================================================================================
def test_import_tensorrt_message(no_tensorrt):
    with pytest.raises(tb.TensorRTNotInstalled, match="pip install tensorrt"):
        tb.import_tensorrt()
    assert issubclass(tb.TensorRTNotInstalled, ImportError)


def test_build_engine_without_tensorrt(decoder_onnx, tmp_path, no_tensorrt):
    with pytest.raises(ImportError, match="TensorRT is not installed; pip install tensorrt"):
        tb.build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"))
    assert not (tmp_path / "m.plan").exists()


def test_open_engine_plan_without_tensorrt(tmp_path, no_tensorrt):
    from rocket_deploy.runtime import open_engine
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0" * 16)
    with pytest.raises(ImportError, match="pip install tensorrt"):
        open_engine(plan)


def _cli(*args):
    from rocket_deploy.cli import main
    return CliRunner().invoke(main, list(args))


def test_build_command_without_tensorrt(decoder_onnx, tmp_path, no_tensorrt):
    res = _cli("build", str(decoder_onnx), "--out", str(tmp_path / "m.plan"), "--batch", "1:1:4",
               "--seq", "1:128:512", "--max-context", "2048")
    assert res.exit_code != 0
    assert "pip install tensorrt" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert "past_key_values.0.key" in res.output   # the profile was printed before trying TensorRT
    assert not (tmp_path / "m.plan").exists()


def test_build_command_directory_and_dry_run(decoder_onnx, no_tensorrt):
    res = _cli("build", str(decoder_onnx.parent), "--seq", "1:4:8", "--max-context", "16", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "1x2x15x8" in res.output and "attention_mask" in res.output


@pytest.mark.parametrize("args,needle", [
    (["--batch", "4:2:1"], "--batch"),
    (["--seq", "x"], "--seq"),
    (["--seq", "1:128:512", "--max-context", "100"], "shorter than the longest sequence"),
    (["--opt-level", "7"], "--opt-level"),
    (["--max-context", "0"], "--max-context"),
])
def test_build_command_bad_options(decoder_onnx, args, needle, no_tensorrt):
    res = _cli("build", str(decoder_onnx), *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_build_command_missing_model(tmp_path):
    res = _cli("build", str(tmp_path / "nope.onnx"))
    assert res.exit_code == 2 and "does not exist" in res.output


def test_build_command_profile_error(tmp_path, no_tensorrt):
    res = _cli("build", str(tiny_matmul(tmp_path / "mm.onnx", np.ones((4, 4), np.float32))))
    assert res.exit_code == 1 and "cannot choose shapes for input 'x'" in res.output


# ================================================================================================================
# doctor
# ================================================================================================================
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
    assert not by_name["tensorrt"].ok and "pip install tensorrt" in by_name["tensorrt"].fix
    plug = by_name["TensorRT plugin library"]
    assert not plug.ok and "cmake -S plugins_trt" in plug.fix
    assert by_name["torch"].ok and by_name["onnx"].ok


def test_diagnostics_plugin_found_but_no_tensorrt(monkeypatch, tmp_path, no_tensorrt, no_plugin):
    lib = tmp_path / tb.PLUGIN_FILENAME
    lib.write_bytes(b"x")
    monkeypatch.setenv(tb.PLUGIN_ENV, str(lib))
    c = diagnostics.check_trt_plugin()
    assert not c.ok and str(lib) in c.detail and "TensorRT is not importable" in c.detail


def test_diagnostics_check_never_raises(monkeypatch):
    monkeypatch.setattr(diagnostics, "_find_nvcc", lambda: (_ for _ in ()).throw(OSError("boom")))
    c = diagnostics.check_nvcc()
    assert c.name == "nvcc" and not c.ok and "boom" in c.detail


# ================================================================================================================
# TrtEngine host logic against a fake TensorRT runtime (CPU memory; same contract: shapes + raw addresses)
# ================================================================================================================
_NP = {"INT64": (np.int64, "c_int64"), "FLOAT": (np.float32, "c_float")}


def _view(ptr, shape, trt_name):
    import ctypes
    np_t, c_t = _NP[trt_name]
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, np_t)
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(getattr(ctypes, c_t))), shape=tuple(shape))


class _FakeContext:
    """Computes :func:`reference_decoder` from the bound input addresses and writes the bound outputs."""

    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.runs = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        assert ptr, f"null address for {name}"
        self.addr[name] = ptr

    def infer_shapes(self):
        return []

    def get_tensor_shape(self, name):
        b, s = self.shapes["input_ids"]
        if name == "logits":
            return (b, s, VOCAB)
        return (b, KV_HEADS, self.shapes["past_key_values.0.key"][2] + s, HEAD_DIM)

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 1234
        get = {n: _view(self.addr[n], self.shapes[n], self.engine.dtypes[n]).copy() for n in self.shapes}
        past = {n: v for n, v in get.items() if n.startswith("past_key_values.")}
        logits, present = reference_decoder(get["input_ids"], get["attention_mask"], get["position_ids"], past)
        for name, value in [("logits", logits), *present.items()]:
            _view(self.addr[name], self.get_tensor_shape(name), "FLOAT")[...] = value
        self.runs += 1
        return True


class _FakeEngine:
    def __init__(self, profile):
        self.profile = profile
        self.dtypes = {"input_ids": "INT64", "attention_mask": "INT64", "position_ids": "INT64", "logits": "FLOAT"}
        self.shapes = {"input_ids": (-1, -1), "attention_mask": (-1, -1), "position_ids": (-1, -1),
                       "logits": (-1, -1, VOCAB)}
        for i in range(LAYERS):
            for k in ("key", "value"):
                for pre in ("past_key_values", "present"):
                    self.dtypes[f"{pre}.{i}.{k}"] = "FLOAT"
                    self.shapes[f"{pre}.{i}.{k}"] = (-1, KV_HEADS, -1, HEAD_DIM)
        self.names = list(self.shapes)
        self.num_io_tensors = len(self.names)
        self.context = None

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "OUTPUT" if name == "logits" or name.startswith("present.") else "INPUT"

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.dtypes[name])

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return list(self.profile[name])

    def create_execution_context(self):
        self.context = _FakeContext(self)
        return self.context


@pytest.fixture
def fake_trt_engine(monkeypatch, tmp_path, decoder_onnx, no_plugin):
    """A TrtEngine over a fake TensorRT module; tensors live in CPU memory."""
    import contextlib

    import torch
    ranges = ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16)
    profile = ranges.profile(decoder_onnx)
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"FAKEPLAN")
    tb.plan_metadata_path(plan).write_text(json.dumps({"max_context": 16, "tensorrt_version": "10.3.0",
                                                        "uses_plugin": False, "onnx": str(decoder_onnx)}))
    engines = []

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            if blob != b"FAKEPLAN":
                return None
            engines.append(_FakeEngine(profile))
            return engines[-1]

    class ILogger:
        def __init__(self):
            pass

    fake = types.SimpleNamespace(__version__="10.8.0", ILogger=ILogger, Runtime=Runtime,
                                 TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "_LOGGER", None)
    monkeypatch.setattr(tb.TrtEngine, "_resolve_device", lambda self, device: torch.device("cpu"))
    monkeypatch.setattr(tb.TrtEngine, "_device_scope", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(tb.TrtEngine, "_stream",
                        lambda self: types.SimpleNamespace(cuda_stream=1234, synchronize=lambda: None))
    return plan, engines


def test_trt_engine_kv_protocol_with_fake_runtime(fake_trt_engine):
    from rocket_deploy.runtime import SamplingParams, open_engine
    plan, engines = fake_trt_engine
    eng = open_engine(plan)
    assert isinstance(eng, tb.TrtEngine) and eng.is_decoder and eng.max_context == 16
    assert eng.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert eng.model_bytes() == len(b"FAKEPLAN")
    ids = np.array([[3, 5, 7], [1, 2, 4]], np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)                    # left padding
    logits, past = eng.forward(ids, mask, None)
    ref, ref_present = reference_decoder(ids, mask, np.array([[0, 1, 2], [1, 0, 1]]), None)
    np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-5)
    assert logits.dtype == np.float32 and past.length == 3 and past.batch == 2
    ctx = engines[0].context
    assert ctx.shapes["past_key_values.0.key"] == (2, KV_HEADS, 0, HEAD_DIM)   # empty past on prefill
    for step in range(3):
        nxt = np.array([[9 + step], [11 + step]], np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        ref_past = {n.replace("present.", "past_key_values."): v for n, v in ref_present.items()}
        ref, ref_present = reference_decoder(nxt, mask, tb.position_ids_from_mask(mask, 1), ref_past)
        logits, past = eng.forward(nxt, mask, past)
        np.testing.assert_allclose(logits, ref, rtol=1e-6, atol=1e-5)
        assert ctx.shapes["position_ids"] == (2, 1)
        np.testing.assert_allclose(past.tensors["past_key_values.1.value"].numpy(), ref_present["present.1.value"])
    assert past.length == 6
    out = list(eng.stream_tokens([1, 2, 3], SamplingParams(max_new_tokens=4, stop_token_ids=(10 ** 6,))))
    assert len(out) == 4 and all(0 <= t < VOCAB for t in out)
    raw = eng.run({"input_ids": ids, "attention_mask": np.ones((2, 3), np.int64),
                   "position_ids": np.tile(np.arange(3), (2, 1)),
                   **{n: np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32) for n in eng.past_names}})
    assert raw["logits"].shape == (2, 3, VOCAB) and raw["present.1.key"].shape == (2, KV_HEADS, 3, HEAD_DIM)


def test_trt_engine_errors_with_fake_runtime(fake_trt_engine, tmp_path):
    plan, engines = fake_trt_engine
    eng = tb.TrtEngine(plan)
    runs = lambda: engines[0].context.runs  # noqa: E731
    with pytest.raises(ValueError, match=r"longer than the max the engine was built for \(16; --max-context\)"):
        eng.forward(np.ones((1, 1), np.int64), np.ones((1, 17), np.int64), tb.TrtKVCache({}, 16, 1))
    with pytest.raises(ValueError, match=r"batch size 3 .*\(--batch\)"):
        eng.forward(np.ones((3, 2), np.int64), np.ones((3, 2), np.int64), None)
    with pytest.raises(ValueError, match=r"9 new tokens .*\(--seq\)"):
        eng.forward(np.ones((1, 9), np.int64), np.ones((1, 9), np.int64), None)
    with pytest.raises(ValueError, match="no past state was given"):
        eng.forward(np.ones((1, 1), np.int64), np.ones((1, 2), np.int64), None)
    _, past = eng.forward(np.ones((1, 2), np.int64), np.ones((1, 2), np.int64), None)
    with pytest.raises(ValueError, match="past holds 2 tokens"):
        eng.forward(np.ones((1, 1), np.int64), np.ones((1, 4), np.int64), past)
    with pytest.raises(TypeError, match="past must be the state"):
        eng.forward(np.ones((1, 1), np.int64), np.ones((1, 3), np.int64), {"x": 1})
    with pytest.raises(ValueError, match="missing engine inputs: attention_mask"):
        eng.run({"input_ids": np.ones((1, 1), np.int64)})
    assert runs() == 1
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"garbage")
    tb.plan_metadata_path(bad).write_text(json.dumps({"tensorrt_version": "10.3.0"}))
    with pytest.raises(RuntimeError, match="built with TensorRT 10.3.0 and this is TensorRT 10.8.0"):
        tb.TrtEngine(bad)
    with pytest.raises(FileNotFoundError, match="no TensorRT plan"):
        tb.TrtEngine(tmp_path / "missing.plan")


class _FakeBuild:
    """A fake ``tensorrt`` module for build_engine: records what the builder was asked to do."""

    def __init__(self, parse_ok=True, build_ok=True, parser_errors=()):
        self.parse_ok, self.build_ok, self.parser_errors = parse_ok, build_ok, list(parser_errors)
        self.calls: dict = {"set_shape": {}, "flags": None, "pool": None, "opt_level": None, "cache_in": None,
                            "monitor": None, "fp16": False}
        rec = self

        class ILogger:
            def __init__(self):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Profile:
            def set_shape(self, name, lo, op, hi):
                rec.calls["set_shape"][name] = (tuple(lo), tuple(op), tuple(hi))

        class Cache:
            def __init__(self, blob):
                self.blob = bytes(blob)

            def serialize(self):
                return b"CACHE+" + self.blob

        class Config:
            def __init__(self):
                self._cache = None

            def set_memory_pool_limit(self, pool, size):
                rec.calls["pool"] = (pool, size)

            @property
            def builder_optimization_level(self):
                return rec.calls["opt_level"]

            @builder_optimization_level.setter
            def builder_optimization_level(self, v):
                rec.calls["opt_level"] = v

            @property
            def progress_monitor(self):
                return rec.calls["monitor"]

            @progress_monitor.setter
            def progress_monitor(self, m):
                rec.calls["monitor"] = m

            def set_flag(self, flag):
                rec.calls["fp16"] = True

            def add_optimization_profile(self, profile):
                return 0

            def create_timing_cache(self, blob):
                return Cache(blob)

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.blob == b"BAD":
                    return False
                rec.calls["cache_in"] = cache.blob
                self._cache = cache
                return True

            def get_timing_cache(self):
                return self._cache

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                for gi in tb.read_onnx_inputs(path):
                    self.network.inputs.append(Tensor(gi.name, tuple(d if isinstance(d, int) else -1
                                                                     for d in gi.dims)))
                return rec.parse_ok

            @property
            def num_errors(self):
                return len(rec.parser_errors)

            def get_error(self, i):
                return rec.parser_errors[i]

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls["flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"SERIALIZED-PLAN" if rec.build_ok else None

        self.module = types.SimpleNamespace(
            __version__="10.3.0", ILogger=ILogger, IProgressMonitor=IProgressMonitor, Builder=Builder,
            OnnxParser=Parser, NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=2),
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"), BuilderFlag=types.SimpleNamespace(FP16=1))


@pytest.fixture
def fake_build(monkeypatch, no_plugin):
    def install(**kw):
        fb = _FakeBuild(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fb.module)
        monkeypatch.setattr(tb, "_LOGGER", None)
        return fb
    return install


def test_build_engine_orchestration_with_fake_builder(fake_build, decoder_onnx, tmp_path):
    fb = fake_build()
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"OLD")
    ranges = ShapeRanges.parse(batch="1:1:4", seq="1:128:512", max_context=2048)
    plan = tb.build_engine(decoder_onnx, tmp_path / "out" / "model.plan", ranges, timing_cache=cache,
                           workspace_gb=2, builder_optimization_level=1, progress=True)
    assert plan.read_bytes() == b"SERIALIZED-PLAN"
    assert fb.calls["flags"] == 1 << 2                       # strongly typed
    assert fb.calls["pool"] == ("WORKSPACE", 2 << 30) and fb.calls["opt_level"] == 1
    assert fb.calls["monitor"] is not None and not fb.calls["fp16"]
    assert fb.calls["set_shape"] == dict(ranges.profile(decoder_onnx))
    assert fb.calls["cache_in"] == b"OLD" and cache.read_bytes() == b"CACHE+OLD"
    meta = tb.read_plan_metadata(plan)
    assert meta["max_context"] == 2048 and meta["decoder"] and meta["tensorrt_version"] == "10.3.0"
    assert meta["profile"]["attention_mask"] == [[1, 1], [1, 1152], [4, 2559]] and meta["uses_plugin"] is False
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_build_engine_mismatched_timing_cache_starts_fresh(fake_build, decoder_onnx, tmp_path, capsys):
    fake_build()
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"BAD")
    tb.build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), timing_cache=cache,
                    progress=False)
    assert "does not match" in capsys.readouterr().err and cache.read_bytes() == b"CACHE+"


def test_build_engine_parser_and_builder_failures(fake_build, decoder_onnx, tmp_path):
    err = types.SimpleNamespace(node=lambda: 3, node_name=lambda: "/layers.0/Gather", node_operator=lambda: "Gather",
                                desc=lambda: "bad indices", code=lambda: "INVALID_NODE")
    fake_build(parse_ok=False, parser_errors=[err])
    with pytest.raises(RuntimeError, match=r"rejected .* \(1 error\(s\)\):\n  \[0\] node 3 '/layers.0/Gather' "
                                           r"\(Gather\): bad indices"):
        tb.build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), progress=False)
    fake_build(build_ok=False)
    with pytest.raises(RuntimeError, match="could not build an engine"):
        tb.build_engine(decoder_onnx, tmp_path / "m.plan", ShapeRanges.parse(seq="1:4:8"), progress=False)
    assert not (tmp_path / "m.plan").exists()


def test_build_engine_needs_the_plugin_for_rocket_graphs(fake_build, tmp_path):
    fake_build()
    path = rocket_op_onnx(tmp_path / "r.onnx", *sparse_layer(16, 8, 4)[:2])
    with pytest.raises(tb.PluginLibraryNotFound, match="cmake -S plugins_trt"):
        tb.build_engine(path, tmp_path / "r.plan", ShapeRanges(overrides={"t": ((1, 16), (4, 16), (8, 16))}))


def test_logger_and_progress_monitor(fake_build, capsys):
    fb = fake_build()
    logger = tb.get_logger(fb.module)
    assert tb.get_logger(fb.module) is logger                   # one per process
    logger.log(types.SimpleNamespace(name="ERROR"), "engine broke")
    logger.log(types.SimpleNamespace(name="INFO"), "chatter")
    assert "engine broke" in tb._recent_errors(logger)
    mon = tb._make_progress_monitor(fb.module)
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


def test_build_command_with_fake_builder(fake_build, decoder_onnx, tmp_path):
    fake_build()
    res = _cli("build", str(decoder_onnx), "--out", str(tmp_path / "m.plan"), "--seq", "1:4:8", "--max-context",
               "32", "--timing-cache", str(tmp_path / "c.cache"), "--quiet")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and (tmp_path / "m.plan").read_bytes() == b"SERIALIZED-PLAN"
    assert (tmp_path / "c.cache").is_file()


# ================================================================================================================
# With TensorRT and a GPU
# ================================================================================================================
def sparse_layer(r, d_out, k, seed=0):
    """A packed sparse V (values [d_out, k], mask uint8 [d_out, ceil(r/8)]) and its dense r x d_out form."""
    from _rocket_fixtures import random_sparse_v
    from rocket_deploy.sparse_format import pack_v
    v, keep = random_sparse_v(r, d_out, k, seed)
    values, mask = pack_v(v, keep)
    return values.numpy(), mask.numpy(), v.numpy()


def rocket_op_onnx(path: Path, values: np.ndarray, mask: np.ndarray) -> Path:
    """y = t @ V with V packed; the op's inputs (t, values, mask) and ``rank`` attribute as the exporter writes them."""
    d_out, _ = values.shape
    r = mask.shape[1] * 8
    node = helper.make_node(tb.ROCKET_OP, ["t", "values", "mask"], ["y"], domain=tb.ROCKET_DOMAIN, rank=r)
    model = _model([node], [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["rows", r])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", d_out])],
                   [numpy_helper.from_array(values, "values"), numpy_helper.from_array(mask, "mask")],
                   opsets=(("", 17), (tb.ROCKET_DOMAIN, 1)))
    onnx.save(model, str(path))
    return path


def _need_trt_gpu():
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT tests need a CUDA GPU")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_build_and_run_matmul(tmp_path):
    _need_trt_gpu()
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    onnx_path = tiny_matmul(tmp_path / "mm.onnx", w)
    ranges = ShapeRanges(overrides={"x": ((1, 1, 16), (2, 4, 16), (4, 8, 16))})
    cache = tmp_path / "timing.cache"
    plan = tb.build_engine(onnx_path, tmp_path / "mm.plan", ranges, timing_cache=cache, workspace_gb=1,
                           builder_optimization_level=0, progress=False)
    assert plan.stat().st_size > 0 and cache.stat().st_size > 0
    meta = tb.read_plan_metadata(plan)
    assert meta["profile"]["x"] == [[1, 1, 16], [2, 4, 16], [4, 8, 16]] and not meta["decoder"]
    eng = tb.TrtEngine(plan)
    assert eng.model_bytes() == plan.stat().st_size
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(eng.run({"x": x})["y"], x @ w, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="batch size 5"):
        eng.run({"x": np.zeros((5, 1, 16), np.float32)})
    # the timing cache is reused on a rebuild
    tb.build_engine(onnx_path, tmp_path / "mm2.plan", ranges, timing_cache=cache, builder_optimization_level=0,
                    progress=False)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_decoder_kv_cache_protocol(tmp_path):
    _need_trt_gpu()
    from rocket_deploy.runtime import SamplingParams, open_engine
    onnx_path = tiny_decoder(tmp_path / "model.onnx")
    plan = tmp_path / "model.plan"
    tb.build_engine(onnx_path, plan, ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16),
                    builder_optimization_level=0, progress=False)
    eng = open_engine(plan)
    assert isinstance(eng, tb.TrtEngine) and eng.is_decoder and eng.max_context == 16
    ids = np.array([[3, 5, 7], [1, 2, 4]], np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    logits, past = eng.forward(ids, mask, None)
    ref, ref_present = reference_decoder(ids, mask, tb.position_ids_from_mask(mask, 3), None)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3)
    assert past.length == 3
    for step in range(3):
        nxt = np.array([[9 + step], [11 + step]], np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        ref_past = {n.replace("present.", "past_key_values."): v for n, v in ref_present.items()}
        ref, ref_present = reference_decoder(nxt, mask, tb.position_ids_from_mask(mask, 1), ref_past)
        logits, past = eng.forward(nxt, mask, past)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(past.tensors["past_key_values.1.value"].cpu().numpy(),
                                   ref_present["present.1.value"], rtol=1e-5, atol=1e-5)
    # longer than the engine was built for
    long_mask = np.ones((1, 17), np.int64)
    with pytest.raises(ValueError, match="longer than the max the engine was built for"):
        eng.forward(np.ones((1, 1), np.int64), long_mask, tb.TrtKVCache({}, 16, 1))
    # generation on top of forward
    out = list(eng.stream_tokens([1, 2, 3], SamplingParams(max_new_tokens=5, stop_token_ids=(10 ** 6,))))
    assert len(out) == 5 and all(0 <= t < VOCAB for t in out)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_rocket_sparse_plugin_matches_numpy(tmp_path):
    _need_trt_gpu()
    try:
        lib = tb.find_plugin_library()
    except tb.PluginLibraryNotFound as e:
        pytest.skip(str(e))
    if lib is None:
        pytest.skip("librocket_trt_plugins.so is not built (" + tb.PLUGIN_BUILD_COMMAND + ")")
    r, d_out, k = 64, 48, 20
    values, mask, dense_v = sparse_layer(r, d_out, k)
    onnx_path = rocket_op_onnx(tmp_path / "rocket.onnx", values, mask)
    ranges = ShapeRanges(overrides={"t": ((1, r), (16, r), (64, r))})
    plan = tb.build_engine(onnx_path, tmp_path / "rocket.plan", ranges, builder_optimization_level=0, progress=False)
    assert tb.read_plan_metadata(plan)["uses_plugin"]
    eng = tb.TrtEngine(plan)
    t = np.random.default_rng(2).standard_normal((37, r)).astype(np.float32)
    np.testing.assert_allclose(eng.run({"t": t})["y"], t @ dense_v, rtol=1e-3, atol=1e-3)
