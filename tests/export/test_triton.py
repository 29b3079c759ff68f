"""Triton config.pbtxt (export/triton.py): a protobuf ModelConfig rendered by text_format, so any name round-trips."""
import os

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from rocket_deploy.export.triton import model_config_class, parse_config, render_config, write_triton_repo

NASTY = 'my "model" \\ with\nnewline and \'quotes\' \u00e9'


def _graph(path, decoder=True, tensor_name="past_key_values.0.key"):
    h = onnx.helper
    ins = [h.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])]
    outs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["batch_size", "sequence_length", 8])]
    nodes = [h.make_node("Cast", ["input_ids"], ["y0"], to=onnx.TensorProto.FLOAT16),
             h.make_node("Unsqueeze", ["y0", "axes"], ["y1"]), h.make_node("Expand", ["y1", "shape"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axes"),
             onnx.numpy_helper.from_array(np.array([1, 1, 8], dtype=np.int64), "shape")]
    if decoder:
        ins.append(h.make_tensor_value_info(tensor_name, onnx.TensorProto.FLOAT16, ["batch_size", 2, "past", 16]))
        outs.append(h.make_tensor_value_info("present", onnx.TensorProto.FLOAT16, ["batch_size", 2, "past", 16]))
        nodes.append(h.make_node("Identity", [tensor_name], ["present"]))
    g = h.make_graph(nodes, "g", ins, outs, inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), path)
    return path


def test_names_with_quotes_backslashes_newlines_round_trip(tmp_path):
    """A model name or tensor name with ", \\, newlines, quotes and non-ASCII parses back exactly (the f-string
    config of old wrote `name: "my "model"..."`, which no protobuf parser reads)."""
    path = _graph(str(tmp_path / "m.onnx"), tensor_name='past_key_values.0."k"\\ey')
    for backend in ("onnxruntime", "tensorrt"):
        text = render_config(NASTY, path, backend=backend)
        cfg = text_format.Parse(text, model_config_class()())
        assert cfg.name == NASTY
        assert [t.name for t in cfg.input] == ["input_ids", 'past_key_values.0."k"\\ey']
        assert (cfg.backend, cfg.platform) == (("onnxruntime", "") if backend == "onnxruntime" else ("", "tensorrt_plan"))
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        assert list(cfg.input[1].dims) == [-1, 2, -1, 16] and list(cfg.output[0].dims) == [-1, -1, 8]
    bad = 'name: "my "model""\n'                 # what an unescaped quote in the name reads like
    with pytest.raises(text_format.ParseError):
        parse_config(bad)


def test_encoder_config_and_field_names(tmp_path):
    """Field names and enum values are Triton's (model_config.proto): what we render parses with the same text."""
    path = _graph(str(tmp_path / "e.onnx"), decoder=False)
    cfg = parse_config(render_config("enc", path, instance_kind="KIND_CPU", instances=2))
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [-1] and list(cfg.output[0].dims) == [-1, 8]        # batch axis left out
    dt = cfg.DESCRIPTOR.file.pool.FindEnumTypeByName("inference.DataType")
    assert dt.values_by_number[cfg.input[0].data_type].name == "TYPE_INT64"
    assert dt.values_by_number[cfg.output[0].data_type].name == "TYPE_FP16"
    g = cfg.instance_group[0]
    assert g.count == 2 and g.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[g.kind].name == "KIND_CPU"
    fields = {f.name: f.number for f in cfg.DESCRIPTOR.fields}
    assert fields == {"name": 1, "platform": 2, "max_batch_size": 4, "input": 5, "output": 6, "instance_group": 7,
                      "dynamic_batching": 11, "parameters": 14, "backend": 17}
    with pytest.raises(ValueError, match="instance_kind"):
        render_config("enc", path, instance_kind="GPU")
    with pytest.raises(text_format.ParseError):
        parse_config('name: "x"\nunknown_field: 3\n')


def test_write_repo_with_odd_name(tmp_path):
    path = _graph(str(tmp_path / "m.onnx"))
    name = 'smol "0.3"\\v1'
    d = write_triton_repo(str(tmp_path / "repo"), path, name=name)
    assert os.path.basename(d) == name and os.path.isfile(os.path.join(d, "1", "model.onnx"))
    assert parse_config(open(os.path.join(d, "config.pbtxt")).read()).name == name
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_triton_repo(str(tmp_path / "repo"), path, name=name)
    assert write_triton_repo(str(tmp_path / "repo"), path, name=name, overwrite=True) == d
    with pytest.raises(ValueError, match="--triton-name"):
        write_triton_repo(str(tmp_path / "repo"), path, name="a/b")
    other = tmp_path / "repo" / "mine"                  # a folder rocket-deploy did not write: never replaced
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a rocket-deploy triton"):
        write_triton_repo(str(tmp_path / "repo"), path, name="mine", overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
