"""ONNX export: both targets on tiny Llama / Qwen2 / Qwen3 / BERT, the custom node's contract, the standard-op
lowering, validation (and its failures), the export CLI and the Triton repository."""
import json
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rocket_deploy.cli import main
from rocket_deploy.export import export_artifact, export_model
from rocket_deploy.export.validate import ToleranceWarning, ValidationShapeError, validate_export
from rocket_deploy.sparse_format import pack_v, unpack_v
from rocket_deploy.testing import tiny_bert, tiny_llama

from _rocket_fixtures import make_artifact, rocketize

DECODER_INPUTS = ["input_ids", "attention_mask", "position_ids"]


def tiny_bert_with_pooler():
    import transformers as tf
    b = tiny_bert()
    m = tf.BertModel(b.config)
    m.load_state_dict(b.state_dict(), strict=False)
    return m.eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_tok):
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        out[arch] = make_artifact(tiny_llama(arch=arch), tiny_tok, str(root / arch))
    out["bert"] = make_artifact(tiny_bert_with_pooler(), tiny_tok, str(root / "bert"))
    return out


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def _inits(m):
    return {i.name: i for i in m.graph.initializer}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_export_decoder_fp32(artifacts, arch, target, tmp_path):
    res = export_artifact(artifacts[arch], str(tmp_path / "o"), target=target, dtype="fp32")
    v = res.validation
    assert v["passed"], v
    assert [s["step"] for s in v["steps"]] == ["prefill (empty past)", "decode (past 7)"]
    for s in v["steps"]:
        assert all(o["max_rel"] < 1e-4 for o in s["outputs"])
    m = onnx.load(res.path)
    ins = [i.name for i in m.graph.input if i.name not in _inits(m)]
    n = 2
    assert ins == DECODER_INPUTS + [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{k}" for i in range(n) for k in ("key", "value")]
    byname = {i.name: i for i in m.graph.input}
    # dynamic axes named as Optimum names them; kv_heads and head_dim static
    assert _dims(byname["input_ids"]) == _dims(byname["position_ids"]) == ["batch_size", "sequence_length"]
    assert _dims(byname["attention_mask"]) == ["batch_size", "total_sequence_length"]
    assert _dims(byname["past_key_values.0.key"]) == ["batch_size", 2, "past_sequence_length", 16]
    outs = {o.name: o for o in m.graph.output}
    assert _dims(outs["logits"]) == ["batch_size", "sequence_length", 512]
    assert _dims(outs["present.1.value"]) == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    rocket = [nd for nd in m.graph.node if nd.domain == "rocket"]
    if target == "trt":
        assert len(rocket) == 14 and res.stats["rocket_nodes"] == 14
    else:
        assert not rocket and all(o.domain in ("", "ai.onnx") for o in m.opset_import)
        assert res.stats["lowering"]["lowered"] == 14
        assert res.stats["lowering"]["dense_v"] > 0 and res.stats["lowering"]["sparse_v"] > 0


def test_trt_node_contract(artifacts, tmp_path):
    res = export_artifact(artifacts["qwen2"], str(tmp_path / "o"), target="trt", dtype="fp32", validate=False)
    m = onnx.load(res.path)
    inits = _inits(m)
    manifest = json.load(open(os.path.join(artifacts["qwen2"], "rocket.json")))["layers"]
    nodes = [nd for nd in m.graph.node if nd.op_type == "RocketSparseVMatMul"]
    assert len(nodes) == len(manifest)
    seen_dense = seen_sparse = False
    for nd in nodes:
        assert nd.domain == "rocket"
        a = {x.name: onnx.helper.get_attribute_value(x) for x in nd.attribute}
        assert a["plugin_version"] == b"1" and a["plugin_namespace"] == b"rocket" and a["value_type"] == 0
        assert len(nd.input) == 3                                       # t, values, mask (no scales at value_type 0)
        t, values, mask = nd.input
        assert t not in inits and values in inits and mask in inits
        layer = values[len("model."):].removesuffix(".v_values")
        rec = manifest[layer]
        assert (a["rank"], a["keep"], a["out_features"]) == (rec["rank"], rec["keep"], rec["d_out"])
        vt, mt = onnx.numpy_helper.to_array(inits[values]), onnx.numpy_helper.to_array(inits[mask])
        assert vt.shape == (rec["d_out"], rec["keep"]) and vt.dtype == np.float32
        assert mt.shape == (rec["d_out"], (rec["rank"] + 7) // 8) and mt.dtype == np.uint8
        if rec["keep"] == rec["rank"]:
            seen_dense = True
            assert (np.unpackbits(mt, axis=1, bitorder="little")[:, :rec["rank"]] == 1).all()
        else:
            seen_sparse = True
            assert (np.unpackbits(mt, axis=1, bitorder="little").sum(1) == rec["keep"]).all()
        # the U product stays a plain MatMul feeding t
        prod = next(p for p in m.graph.node if t in p.output)
        assert prod.op_type == "MatMul" and prod.input[1].endswith(".u")
    assert seen_dense and seen_sparse
    # onnx.checker accepts the graph with the rocket domain registered, and knows the op's schema
    from rocket_deploy.export.schema import register_rocket_schema
    register_rocket_schema()
    onnx.checker.check_model(m)
    assert onnx.defs.get_schema("RocketSparseVMatMul", 1, "rocket").domain == "rocket"


@pytest.mark.parametrize("domain", ["rocket", "trt.plugins"])
def test_strict_shape_inference_without_value_info(artifacts, domain, tmp_path):
    """The plugin op's schema infers y = t's shape with the last dim out_features (dtype of t): with value_info
    cleared, strict shape inference of the trt graph (either plugin domain) rebuilds every shape downstream."""
    from rocket_deploy.export.schema import register_rocket_schema
    res = export_artifact(artifacts["qwen2"], str(tmp_path / "o"), target="trt", validate=False, plugin_domain=domain)
    m = onnx.load(res.path)
    register_rocket_schema()
    del m.graph.value_info[:]
    want = {o.name: _dims(o) for o in m.graph.output}
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    inf = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    shapes = {v.name: v for v in inf.graph.value_info}
    nodes = [nd for nd in inf.graph.node if nd.op_type == "RocketSparseVMatMul"]
    assert nodes and all(nd.domain == domain for nd in nodes)
    for nd in nodes:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in nd.attribute}
        t, y = shapes[nd.input[0]], shapes[nd.output[0]]
        assert _dims(y)[:-1] == _dims(t)[:-1] and _dims(y)[-1] == a["out_features"] and _dims(t)[-1] == a["rank"]
        assert y.type.tensor_type.elem_type == t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    got = {o.name: _dims(o) for o in inf.graph.output}
    assert got["logits"][-1] == want["logits"][-1] == 512 and len(got["logits"]) == 3
    assert got["present.0.key"][1:2] == [2] and got["present.0.key"][3] == 16
    # a node whose t does not have `rank` columns is an inference error, not a silently wrong shape
    bad = nodes[0]
    for x in bad.attribute:
        if x.name == "rank":
            x.i += 1
    with pytest.raises(onnx.shape_inference.InferenceError, match="rank"):
        onnx.shape_inference.infer_shapes(inf, check_type=True, strict_mode=True)


def test_trt_plugin_domain_for_ort_tensorrt_ep(artifacts, tmp_path):
    """--plugin-domain trt.plugins: the plugin nodes (and only they) move into the domain ORT's TensorRT EP maps to
    plugins; the graph is still checked and validated, and the domain is recorded."""
    res = export_artifact(artifacts["llama"], str(tmp_path / "o"), target="trt", plugin_domain="trt.plugins")
    assert res.validation["passed"] and res.stats["plugin_domain"] == "trt.plugins"
    m = onnx.load(res.path)
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets.get("trt.plugins") == 1 and "rocket" not in opsets
    plug = [nd for nd in m.graph.node if nd.op_type == "RocketSparseVMatMul"]
    assert len(plug) == res.stats["rocket_nodes"] == 14 and {nd.domain for nd in plug} == {"trt.plugins"}
    assert not [nd for nd in m.graph.node if nd.domain == "trt.plugins" and nd.op_type != "RocketSparseVMatMul"]
    assert {p.key: p.value for p in m.metadata_props}["rocket.plugin_domain"] == "trt.plugins"
    info = json.load(open(os.path.join(os.path.dirname(res.path), "export.json")))
    assert info["plugin_domain"] == "trt.plugins"
    default = export_artifact(artifacts["llama"], str(tmp_path / "d"), target="trt", validate=False)
    assert {nd.domain for nd in onnx.load(default.path).graph.node if nd.op_type == "RocketSparseVMatMul"} == {"rocket"}
    from rocket_deploy.export import ExportError
    with pytest.raises(ExportError, match="--target trt only"):
        export_artifact(artifacts["llama"], str(tmp_path / "x"), target="ort", plugin_domain="trt.plugins")
    with pytest.raises(ExportError, match="plugin domain"):
        export_artifact(artifacts["llama"], str(tmp_path / "x"), target="trt", plugin_domain="custom")
    assert not os.path.exists(tmp_path / "x")


def test_encoder_without_token_type_ids(tmp_path):
    """An encoder whose forward takes no token_type_ids (DistilBERT) is exported with input_ids / attention_mask."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=128, dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=64)
    model = tf.DistilBertModel(cfg).eval()
    res = export_model(model, str(tmp_path / "o"))
    assert res.validation["passed"] and res.input_names == ["input_ids", "attention_mask"]
    m = onnx.load(res.path)
    assert [i.name for i in m.graph.input if i.name not in _inits(m)] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_export_fp16(artifacts, target, tmp_path):
    res = export_artifact(artifacts["llama"], str(tmp_path / "o"), target=target, dtype="fp16")
    assert res.validation["passed"] and res.validation["tolerance"]["rtol"] > 1e-3
    m = onnx.load(res.path)
    byname = {i.name: i for i in m.graph.input}
    assert byname["past_key_values.0.key"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    if target == "trt":
        vals = [i for i in m.graph.initializer if i.name.endswith(".v_values")]
        assert vals and all(i.data_type == onnx.TensorProto.FLOAT16 for i in vals)   # strongly typed fp16


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_export_bert(artifacts, target, tmp_path):
    """BERT takes token_type_ids: the graph does too (Optimum's encoder inputs), and validation feeds random
    segment ids to both sides, so the token-type embedding is checked."""
    res = export_artifact(artifacts["bert"], str(tmp_path / "o"), target=target)
    assert res.validation["passed"] and not res.is_decoder
    m = onnx.load(res.path)
    ins = [i for i in m.graph.input if i.name not in _inits(m)]
    assert [i.name for i in ins] == ["input_ids", "attention_mask", "token_type_ids"] == res.input_names
    assert all(_dims(i) == ["batch_size", "sequence_length"] for i in ins)
    assert any("token_type_ids" in nd.input for nd in m.graph.node)
    assert [o.name for o in m.graph.output] == ["last_hidden_state"]
    assert sum(nd.op_type == "RocketSparseVMatMul" for nd in m.graph.node) == (12 if target == "trt" else 0)


def test_ort_file_is_small(artifacts, tmp_path):
    """The ort file keeps V packed and weights in fp16 (cast at session start): about the artifact's size."""
    a = artifacts["llama"]
    ort_res = export_artifact(a, str(tmp_path / "ort"), target="ort", validate=False)
    trt_res = export_artifact(a, str(tmp_path / "trt"), target="trt", validate=False)
    from safetensors.torch import load_file
    art = sum(t.numel() * t.element_size() for f in ("factors.safetensors", "model.safetensors")
              for t in load_file(os.path.join(a, f)).values())

    def init_bytes(path):
        return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(path).graph.initializer)
    # tiny models: the graph itself dominates the file, so compare the weights it stores
    assert init_bytes(ort_res.path) < 1.1 * art
    assert init_bytes(ort_res.path) < 0.6 * init_bytes(trt_res.path)   # trt fp32 stores fp32 values


def test_debug_metadata_stripped_unless_asked(artifacts, tmp_path):
    """The exporter's per-node stack traces (local paths, kB per node) are not shipped by default."""
    a = artifacts["llama"]
    lean = export_artifact(a, str(tmp_path / "lean"), target="trt", validate=False)
    full = export_artifact(a, str(tmp_path / "full"), target="trt", validate=False, debug_metadata=True)

    def node_metadata(path):
        return [p.key for n in onnx.load(path).graph.node for p in n.metadata_props]
    assert node_metadata(lean.path) == []
    assert "pkg.torch.onnx.stack_trace" in node_metadata(full.path)
    assert lean.stats["stripped_metadata_bytes"] > 100_000
    assert full.file_bytes - lean.file_bytes > 100_000
    m = onnx.load(lean.path)
    assert {p.key: p.value for p in m.metadata_props}["rocket.target"] == "trt"     # the model's own metadata stays
    assert len(m.graph.node) == len(onnx.load(full.path).graph.node)


def test_external_data(artifacts, tmp_path):
    res = export_artifact(artifacts["llama"], str(tmp_path / "o"), external_data=True)
    data = os.path.join(os.path.dirname(res.path), "model.onnx.data")
    m = onnx.load(res.path, load_external_data=False)
    ext = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) > 20 and os.path.getsize(data) > 100_000
    assert res.file_bytes == os.path.getsize(res.path) + os.path.getsize(data)
    assert res.validation["passed"]


def _single_node_model(rank, keep, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rank, d_out, generator=g)
    if keep < rank:
        idx = torch.rand(rank, d_out, generator=g).argsort(0)[:keep]
        km = torch.zeros(rank, d_out, dtype=torch.bool).scatter_(0, idx, True)
    else:
        km = torch.ones(rank, d_out, dtype=torch.bool)
    values, mask = pack_v(v, km)
    u = torch.randn(d_in, rank, generator=g)
    h, nh = onnx.helper, onnx.numpy_helper
    nodes = [h.make_node("MatMul", ["x", "u"], ["t"]),
             h.make_node("RocketSparseVMatMul", ["t", "v_values", "v_mask"], ["y"], domain="rocket", rank=rank,
                         keep=keep, out_features=d_out, value_type=0, plugin_version="1", plugin_namespace="rocket")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", d_in])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", d_out])],
                         [nh.from_array(u.numpy(), "u"), nh.from_array(values.numpy(), "v_values"),
                          nh.from_array(mask.numpy(), "v_mask")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("rocket", 1)])
    dense_v = unpack_v(values, mask, rank)
    return model, u, dense_v


@pytest.mark.parametrize("rank,keep", [(24, 24), (24, 7), (13, 5), (8, 1)])
@pytest.mark.parametrize("merge", ["never", "always"])
def test_lowering_matches_reference(rank, keep, merge):
    import onnx_ir as ir
    import onnxruntime as ort
    from rocket_deploy.export.lowering import lower_rocket_nodes
    model, u, dense_v = _single_node_model(rank, keep, 20, 33, seed=rank * 100 + keep)
    im = ir.from_proto(model)
    stats = lower_rocket_nodes(im, merge=merge)
    assert stats["lowered"] == 1 and stats["merged"] == (1 if merge == "always" else 0)
    proto = ir.to_proto(im)
    onnx.checker.check_model(proto)
    assert not any(nd.domain == "rocket" for nd in proto.graph.node)
    x = np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        y = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ref = (torch.from_numpy(x).double() @ u.double() @ dense_v.double()).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_fp16_storage_is_lossless():
    import onnx_ir as ir
    import onnxruntime as ort
    from rocket_deploy.export.lowering import store_weights_fp16
    h, nh = onnx.helper, onnx.numpy_helper
    w16 = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float16).astype(np.float32)
    w32 = np.random.default_rng(2).standard_normal((40, 30)).astype(np.float32)          # not fp16-exact
    g = h.make_graph([h.make_node("MatMul", ["x", "a"], ["t"]), h.make_node("MatMul", ["x", "b"], ["s"]),
                      h.make_node("Add", ["t", "s"], ["y"])], "g",
                     [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 40])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 30])],
                     [nh.from_array(w16, "a"), nh.from_array(w32, "b")])
    im = ir.from_proto(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]))
    st = store_weights_fp16(im)
    assert st["fp16_stored"] == 1 and st["bytes_saved"] == w16.nbytes // 2
    proto = ir.to_proto(im)
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    assert kinds["a.fp16"] == onnx.TensorProto.FLOAT16 and kinds["b"] == onnx.TensorProto.FLOAT
    x = np.random.default_rng(3).standard_normal((2, 40)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x @ w16 + x @ w32)


def test_activation_quantized_criterion():
    """Graphs that quantize activations are judged on the next-token distribution (logits) and relative RMS
    (other outputs): a rounding-sized change with one large outlier passes there (not elementwise); a wrong
    output fails both."""
    from rocket_deploy.export.validate import ACT_QUANT_TOLERANCE, TOLERANCES, compare, next_token_kl
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (12, 64)).astype(np.float32)
    noisy = ref + rng.normal(0, 0.02, ref.shape).astype(np.float32)
    noisy[3, 5] += 0.5                                       # one outlier: ~5% of the logits' range
    strict = compare("logits", noisy, ref, TOLERANCES["fp32"])
    loose = compare("logits", noisy, ref, ACT_QUANT_TOLERANCE, act_quant=True)
    assert not strict["passed"] and loose["passed"] and loose["max_rel"] == strict["max_rel"] > 0.04
    assert 0 < loose["kl"] < 1e-2 and loose["top1"] > 0.8
    wrong = compare("logits", ref[::-1].copy(), ref, ACT_QUANT_TOLERANCE, act_quant=True)
    assert not wrong["passed"] and wrong["kl"] > 1.0
    kl, top1 = next_token_kl(ref, ref)
    assert abs(kl) < 1e-12 and top1 == 1.0
    kv = rng.normal(0, 1, (2, 4, 7, 8))
    assert compare("present.0.key", kv * 1.01, kv, ACT_QUANT_TOLERANCE, act_quant=True)["passed"]
    bad = compare("present.0.key", kv + rng.normal(0, 1.0, kv.shape), kv, ACT_QUANT_TOLERANCE, act_quant=True)
    assert not bad["passed"] and bad["rel_rms"] > 0.7
    nan = noisy.copy()
    nan[0, 0] = np.nan
    assert not compare("logits", nan, ref, ACT_QUANT_TOLERANCE, act_quant=True)["passed"]


def test_validation_catches_wrong_weights(artifacts, tmp_path):
    res = export_artifact(artifacts["llama"], str(tmp_path / "o"), target="trt", validate=False)
    m = onnx.load(res.path)
    init = next(i for i in m.graph.initializer if i.name.endswith("layers.0.self_attn.q_proj.v_values"))
    arr = onnx.numpy_helper.to_array(init) * 3.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    bad = str(tmp_path / "bad.onnx")
    onnx.save(m, bad)
    from rocket_deploy.artifact import load_artifact
    model = load_artifact(artifacts["llama"])[0]
    with pytest.warns(ToleranceWarning, match="EXPORT VALIDATION FAILED"):
        rep = validate_export(bad, model, target="trt")
    assert not rep["passed"]
    # the looser test of activation-quantized graphs (next-token KL, rel RMS) still catches a grossly wrong
    # weight (a tiny random model's flat logits hide a scaled q_proj, so an MLP output is corrupted here)
    init = next(i for i in m.graph.initializer if i.name.endswith("layers.0.mlp.down_proj.v_values"))
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 10.0, init.name))
    onnx.save(m, bad)
    with pytest.warns(ToleranceWarning, match="quantized-activation"):
        rep = validate_export(bad, model, target="trt", act_quant=True)
    assert not rep["passed"] and rep["activations_quantized"]
    other = tiny_llama(vocab_size=320)             # same layout, other vocab: logits shape differs -> error
    rocketize(other)
    with pytest.raises(ValidationShapeError, match="logits"):
        validate_export(res.path, other, target="trt")


def test_torch_side_uses_current_cache_api(artifacts, tmp_path, monkeypatch):
    """The export wrapper and the validation pass the KV cache to torch under transformers' current keyword
    (``cache`` in 5.x; deprecated ``past_key_values``: FutureWarning on the argument, a logged warning on the
    output field), while the graph keeps its ``past_key_values.{i}.key`` input names."""
    import logging

    from rocket_deploy.artifact import load_artifact
    from rocket_deploy.export.graph_io import DecoderWrapper, example_inputs
    res = export_artifact(artifacts["llama"], str(tmp_path / "o"), target="ort", validate=False)
    assert "past_key_values.0.key" in res.input_names
    model = load_artifact(artifacts["llama"])[0]
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)),
                        raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            outs = DecoderWrapper(model)(*example_inputs(model))
        rep = validate_export(res.path, model, target="ort")
    assert not [m for m in logged if "past_key_values" in m or "deprecated" in m], logged
    assert rep["passed"] and len(outs) == 1 + 2 * model.config.num_hidden_layers


# ---- CLI ------------------------------------------------------------------------------------------------------------
def run(args):
    return CliRunner().invoke(main, args)


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def _config(repo, name):
    """config.pbtxt parsed back as a ModelConfig message (text format: any unparsable or unknown field raises)."""
    from rocket_deploy.export.triton import parse_config
    return parse_config(open(os.path.join(repo, name, "config.pbtxt")).read())


def _dtype(tensor):
    return tensor.DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[tensor.data_type].name


def test_cli_export_and_triton(artifacts, tmp_path):
    out, repo = str(tmp_path / "onnx"), str(tmp_path / "triton")
    r = run(["export", artifacts["llama"], "--out", out, "--triton-repo", repo, "--triton-name", "smol"])
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and "prefill (empty past)" in r.output
    j = last_json(r)
    assert j["passed"] and j["target"] == "ort" and j["bytes"] > 0 and j["max_rel"] < 1e-4
    for f in ("model.onnx", "export.json", "tokenizer.json", "config.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    cfg = _config(repo, "smol")
    assert cfg.name == "smol" and cfg.backend == "onnxruntime" and not cfg.platform and cfg.max_batch_size == 0
    text = open(os.path.join(repo, "smol", "config.pbtxt")).read()
    assert "max_batch_size: 0" in text                                 # written, not left to the default
    assert not cfg.HasField("dynamic_batching")                         # KV-cache models: off
    io = {t.name: t for t in [*cfg.input, *cfg.output]}
    assert list(io["past_key_values.1.value"].dims) == [-1, 2, -1, 16]
    assert list(io["logits"].dims) == [-1, -1, 512] and _dtype(io["logits"]) == "TYPE_FP32"
    assert _dtype(io["input_ids"]) == "TYPE_INT64"
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, 0)]     # KIND_AUTO
    assert os.path.isfile(os.path.join(repo, "smol", "1", "model.onnx"))
    # exists without --overwrite: error naming the fix; with it: fine
    r = run(["export", artifacts["llama"], "--out", out])
    assert r.exit_code == 1 and "--overwrite" in r.output and "Traceback" not in r.output
    r = run(["export", artifacts["llama"], "--out", out, "--overwrite", "--target", "trt", "--dtype", "fp16",
             "--triton-repo", repo, "--triton-name", "smol", "--json"])
    assert r.exit_code == 0, r.output
    j = last_json(r)
    assert j["target"] == "trt" and j["dtype"] == "fp16" and j["passed"]
    cfg = _config(repo, "smol")
    assert cfg.platform == "tensorrt_plan" and not cfg.backend
    assert _dtype(next(o for o in cfg.output if o.name == "logits")) == "TYPE_FP16"
    assert "librocket_trt_plugins.so" in cfg.parameters["plugin"].string_value
    assert os.path.isfile(os.path.join(repo, "smol", "1", "BUILD_PLAN.txt"))


def test_cli_encoder_triton_has_dynamic_batching(artifacts, tmp_path):
    repo = str(tmp_path / "triton")
    r = run(["export", artifacts["bert"], "--out", str(tmp_path / "b"), "--triton-repo", repo, "--json"])
    assert r.exit_code == 0, r.output
    cfg = _config(repo, "b")
    assert cfg.max_batch_size == 8 and cfg.HasField("dynamic_batching")
    assert [list(t.dims) for t in cfg.input] == [[-1]] * 3                  # batch axis left out
    assert list(cfg.output[0].dims) == [-1, 64]


def test_cli_export_errors(tmp_path, tiny_llama_dir, artifacts):
    r = run(["export", tiny_llama_dir, "--out", str(tmp_path / "x")])      # a HF directory, not an artifact
    assert r.exit_code == 2 and "not a rocket-deploy artifact" in r.output and "Traceback" not in r.output
    r = run(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a directory" in r.output
    r = run(["export", artifacts["llama"], "--out", str(tmp_path / "x"), "--target", "tensorrt"])
    assert r.exit_code == 2 and "--target" in r.output and "'ort'" in r.output
    r = run(["export", artifacts["llama"], "--out", str(tmp_path / "x"), "--dtype", "int8"])
    assert r.exit_code == 2 and "--dtype" in r.output
    assert not os.path.exists(tmp_path / "x")


def test_cli_plugin_domain(artifacts, tmp_path):
    r = run(["export", artifacts["llama"], "--out", str(tmp_path / "p"), "--target", "trt", "--plugin-domain",
             "trt.plugins", "--no-validate", "--json"])
    assert r.exit_code == 0, r.output
    assert last_json(r)["plugin_domain"] == "trt.plugins"
    m = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert {nd.domain for nd in m.graph.node if nd.op_type == "RocketSparseVMatMul"} == {"trt.plugins"}
    r = run(["export", artifacts["llama"], "--out", str(tmp_path / "x"), "--plugin-domain", "trt.plugins"])
    assert r.exit_code == 1 and "--target trt only" in r.output and "Traceback" not in r.output
    r = run(["export", artifacts["llama"], "--out", str(tmp_path / "x"), "--target", "trt", "--plugin-domain", "x"])
    assert r.exit_code == 2 and "--plugin-domain" in r.output
    assert not os.path.exists(tmp_path / "x")


def test_cli_export_dense(tiny_llama_dir, tmp_path):
    r = run(["export", tiny_llama_dir, "--dense", "--out", str(tmp_path / "d"), "--json"])
    assert r.exit_code == 0, r.output
    assert last_json(r)["passed"]
    m = onnx.load(str(tmp_path / "d" / "model.onnx"))
    assert not any(nd.domain == "rocket" for nd in m.graph.node)
