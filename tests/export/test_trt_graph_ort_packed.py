"""The ``ort-packed`` graph pass (export/trt_graph.pack_for_ort) and its inverse for validation, on small hand-built
graphs (no custom-op library needed): which weights become fp16 ``RocketMatMulF16`` / fp16 ``Gather`` / fp16 V
values, which stay fp32, that the unpacked copy computes what the original fp32 graph computes, and the refusals
(quantized V in the pass, a quantized model before tracing)."""
import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rocket_deploy.export.options import ExportError, quant_export_settings
from rocket_deploy.export.trt_graph import PACK_MIN_ELEMENTS, pack_for_ort, unpack_for_validation
from rocket_deploy.onnx_contract import F16_MATMUL_OP, ONNX_DOMAIN, ONNX_OP, ORT_PACKED_TARGET

from _rocket_fixtures import random_sparse_v

K, N, V = 64, 48, 40          # hidden, projection width, vocab


def _fp16_exact(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16).astype(np.float32)


def _graph(vt: int = 0):
    """ids -> Gather(E [V, K]) -> MatMul(W [K, N]) -> MatMul(U [N, r]) -> RocketSparseVMatMul -> MatMul(R [K, K],
    not fp16-exact) -> MatMul(Transpose(E)) (tied lm_head) -> logits."""
    from rocket_deploy.sparse_format import pack_v
    r, keep = 32, 12
    v, kmask = random_sparse_v(r, K, keep, 3)
    vals, mask = pack_v(v.half().float(), kmask)
    e, w, u = _fp16_exact((V, K), 0), _fp16_exact((K, N), 1), _fp16_exact((N, r), 2)
    rough = np.random.default_rng(4).standard_normal((K, K)).astype(np.float32)     # not representable in fp16
    inits = [numpy_helper.from_array(e, "E"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(u, "U"),
             numpy_helper.from_array(vals.numpy().astype(np.float32), "vals"),
             numpy_helper.from_array(mask.numpy(), "mask"), numpy_helper.from_array(rough, "R")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h0"], axis=0),
             helper.make_node("MatMul", ["h0", "W"], ["h1"]),
             helper.make_node("MatMul", ["h1", "U"], ["t"]),
             helper.make_node(ONNX_OP, ["t", "vals", "mask"], ["h2"], domain=ONNX_DOMAIN, rank=r, keep=keep,
                              out_features=K, value_type=vt, plugin_version="1", plugin_namespace="rocket"),
             helper.make_node("MatMul", ["h2", "R"], ["h3"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h3", "Et"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, V])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, 1)])
    return ir.from_proto(m)


def _run(model: ir.Model, ids):
    import onnxruntime as ort
    from rocket_deploy.export.lowering import lower_rocket_nodes
    lower_rocket_nodes(model, merge="never")
    proto = ir.to_proto(model)
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"ids": ids})[0]


def test_pack_keeps_exact_weights_fp16_and_leaves_the_rest():
    model = _graph()
    st = pack_for_ort(model)
    assert st["f16_matmul"] == 3 and st["fp16_gather"] == 1 and st["fp32_weights_left"] == 1, st
    g = model.graph
    f16 = [n for n in g if n.op_type == F16_MATMUL_OP]
    assert all(n.inputs[1].dtype == ir.DataType.FLOAT16 and n.domain == ONNX_DOMAIN for n in f16)
    shapes = sorted(tuple(n.inputs[1].shape) for n in f16)
    assert shapes == sorted([(N, K), (32, N), (V, K)])          # [out, in]: W^T, U^T, and E itself (tied lm_head)
    lm_head = [n for n in f16 if tuple(n.inputs[1].shape) == (V, K)][0]
    gather = [n for n in g if n.op_type == "Gather"][0]
    assert gather.inputs[0] is lm_head.inputs[1]                # one fp16 table for the embedding and the lm_head
    assert not [n for n in g if n.op_type == "Transpose"]
    sparse = [n for n in g if n.op_type == ONNX_OP][0]
    assert sparse.inputs[1].dtype == ir.DataType.FLOAT16
    left = [n for n in g if n.op_type == "MatMul"]
    assert len(left) == 1 and left[0].inputs[1].name == "R" and left[0].inputs[1].dtype == ir.DataType.FLOAT
    assert set(g.initializers) == {"E.fp16", "W.fp16.t", "U.fp16.t", "vals.fp16", "mask", "R"}
    assert PACK_MIN_ELEMENTS > 0


def test_unpacked_copy_computes_the_original():
    ids = np.array([[3, 1, 4, 1, 5]], dtype=np.int64)
    want = _run(_graph(), ids)
    packed = _graph()
    pack_for_ort(packed)
    packed = ir.from_proto(ir.to_proto(packed))                  # as saved and loaded again
    assert unpack_for_validation(packed) == 4                    # 3 RocketMatMulF16 + 1 fp16-values node
    got = _run(packed, ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dense_v_becomes_a_f16_matmul_and_unpacks_exactly():
    import onnxruntime as ort
    r, d = 16, 24
    v = _fp16_exact((r, d), 7)
    from rocket_deploy.sparse_format import pack_v
    vals, mask = pack_v(torch.from_numpy(v), torch.ones(r, d, dtype=torch.bool))
    node = helper.make_node(ONNX_OP, ["t", "vals", "mask"], ["y"], domain=ONNX_DOMAIN, rank=r, keep=r,
                            out_features=d, value_type=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, r])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])],
                          [numpy_helper.from_array(vals.numpy(), "vals"), numpy_helper.from_array(mask.numpy(), "mask")])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                              helper.make_opsetid(ONNX_DOMAIN, 1)]))
    st = pack_for_ort(model)
    assert st["dense_v_f16"] == 1 and st["f16_matmul"] == 1 and st["fp16_v_values"] == 0, st
    (f16,) = list(model.graph)
    assert f16.op_type == F16_MATMUL_OP and tuple(f16.inputs[1].shape) == (d, r)
    assert [a.value for a in (f16.attributes["in_features"], f16.attributes["out_features"])] == [r, d]
    assert set(model.graph.initializers) == {"vals.fp16"}          # the all-ones mask is gone
    unpack_for_validation(model)
    s = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    t = np.random.default_rng(0).standard_normal((3, r)).astype(np.float32)
    np.testing.assert_allclose(s.run(None, {"t": t})[0], t.astype(np.float64) @ v, rtol=1e-5, atol=1e-5)


def test_ort_packed_target_is_fp32_compute_only():
    from rocket_deploy.export.options import check_options
    check_options(ORT_PACKED_TARGET, "fp32")
    for dt in ("fp16", "bf16"):
        with pytest.raises(ExportError, match="ort-packed computes in fp32"):
            check_options(ORT_PACKED_TARGET, dt)
    with pytest.raises(ExportError, match="applies to --target trt only"):
        check_options(ORT_PACKED_TARGET, "fp32", "trt.plugins")


def test_pack_refuses_quantized_v():
    with pytest.raises(ValueError, match="value_type 0 only"):
        pack_for_ort(_graph(vt=1))


def test_ort_packed_target_refuses_quantized_models_before_tracing(tiny_tok, tmp_path):
    from rocket_deploy.artifact import load_artifact
    from rocket_deploy.testing import tiny_llama

    from _rocket_fixtures import make_quant_artifact
    art = make_quant_artifact(tiny_llama(), tiny_tok, str(tmp_path / "q"), "int8")
    model, _, _ = load_artifact(art, dtype=torch.float32)
    with pytest.raises(ExportError, match="ort-packed runs unquantized"):
        quant_export_settings(model, ORT_PACKED_TARGET, "fp32")
    assert quant_export_settings(model, "ort", "fp32")["formats"] == ["int8"]     # the other targets still take it
