"""Optimization profiles (runtime/trt/profiles.py, onnx_graph.py): ranges parsed from the CLI syntax, min / opt / max
shapes for every input of decoder, encoder and other graphs, and shape checks against a profile. No TensorRT."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, tiny_decoder, tiny_encoder, tiny_matmul
from onnx import TensorProto, helper

from rocket_deploy.runtime.trt import (DimRange, GraphInput, ShapeRanges, check_profile_shapes, format_profile,
                                       read_onnx_inputs)


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
    inputs = read_onnx_inputs(path)
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
    text = format_profile(ShapeRanges.parse(seq="1:4:8", max_context=16).profile(decoder_onnx))
    lines = text.splitlines()
    assert lines[0].split() == ["input", "min", "opt", "max"]
    assert any(line.split() == ["past_key_values.0.key", "1x2x0x8", "1x2x8x8", "1x2x15x8"] for line in lines)


def test_check_profile_shapes_messages():
    prof = {"input_ids": ((1, 1), (1, 4), (2, 8)), "attention_mask": ((1, 1), (1, 12), (2, 23)),
            "past_key_values.0.key": ((1, 2, 0, 8), (1, 2, 8, 8), (2, 2, 15, 8))}
    check_profile_shapes({"input_ids": (2, 8), "attention_mask": (2, 16)}, prof, max_context=16)
    with pytest.raises(ValueError, match=r"batch size 3 is outside the engine's range \[1, 2\] \(--batch\)"):
        check_profile_shapes({"input_ids": (3, 1)}, prof)
    with pytest.raises(ValueError, match=r"9 new tokens per call .*\[1, 8\] \(--seq\)"):
        check_profile_shapes({"input_ids": (1, 9)}, prof)
    with pytest.raises(ValueError, match=r"context of 17 tokens .* longer than the max the engine was built for "
                                         r"\(16; --max-context\)"):
        check_profile_shapes({"input_ids": (1, 1), "attention_mask": (1, 17)}, prof, max_context=16)
    with pytest.raises(ValueError, match=r"past of 16 tokens .*\[0, 15\]"):
        check_profile_shapes({"past_key_values.0.key": (1, 2, 16, 8)}, prof)
    with pytest.raises(ValueError, match="rank 3"):
        check_profile_shapes({"input_ids": (1, 1, 1)}, prof)
    with pytest.raises(ValueError, match="rocket-deploy build"):
        check_profile_shapes({"input_ids": (1, 9)}, prof)
