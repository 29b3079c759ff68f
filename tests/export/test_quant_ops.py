"""ONNX building blocks for quantized layers (export/quantized_ops.py) against the torch modules, in ONNX Runtime."""
import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from rocket_deploy.compress.factorize import eigenbasis, factorize  # noqa: E402
from rocket_deploy.compress.quantize import quantize_cols, quantize_dense, quantize_factors, quantize_int4  # noqa: E402
from rocket_deploy.export.quantized_ops import (  # noqa: E402
    custom_translation_table, export_module_for, fp8_e4m3fn_table, quant_linear_model)
from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear  # noqa: E402


def _run(model_bytes, x, level=None):
    so = ort.SessionOptions()
    if level is not None:
        so.graph_optimization_level = level
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_fp8_table():
    t = fp8_e4m3fn_table()
    assert t.shape == (256,) and t[0x38] == 1.0 and t[0x7E] == 448.0 and t[0xFE] == -448.0 and np.isnan(t[0x7F])


@pytest.mark.parametrize("kind", ["int8-cast", "int8-dq-fused", "int8-dynamic", "fp8-lut", "int4-nbits"])
def test_graph_blocks_match_dequantized_weight(kind):
    torch.manual_seed(0)
    k, n = 200, 48                        # K not a multiple of the int4 block: padded last block
    w = torch.randn(k, n) / 10
    if kind.startswith("int4"):
        packed, scales, zeros, deq = quantize_int4(w, 64)
        weights = {"packed": packed.numpy(), "scales": scales.float().numpy(), "zeros": zeros.numpy(), "block_size": 64}
    elif kind == "fp8-lut":
        q, s, deq = quantize_cols(w, "fp8")
        weights = {"bits": q.view(torch.uint8).numpy(), "scales": s.numpy()}
    else:
        q, s, deq = quantize_cols(w, "int8")
        weights = {"q": q.numpy(), "scales": s.numpy()}
    x = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    y = _run(quant_linear_model(kind, k, n, weights).SerializeToString(), x)
    ref = x @ deq.numpy()
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    if kind in ("int8-dq-fused", "int8-dynamic"):       # activations quantized at run time: approximate
        assert 1e-5 < rel < 0.03
    else:
        assert rel < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("layer", ["dense", "rocket"])
def test_torch_export_of_quantized_layers(scheme, layer):
    from rocket_deploy.export.lowering import lower_rocket_nodes
    from rocket_deploy.export.rocket_op import custom_translation_table as rocket_table
    import onnx_ir as ir
    torch.manual_seed(1)
    w = torch.randn(200, 48, dtype=torch.float64) / 10
    s = torch.eye(200, dtype=torch.float64)
    bias = torch.randn(48).half()
    if layer == "dense":
        mod = QuantDenseLinear.from_quantized(quantize_dense(w, s, scheme, 64), bias)
    else:
        f = factorize(eigenbasis(w, s), 32, 16)
        mod = QuantRocketLinear.from_quantized(quantize_factors(f.u, f.v, f.keep_mask, s, scheme, 64), 200, 48, bias)
    x = torch.randn(2, 5, 200)
    exp = export_module_for(mod)
    assert torch.allclose(exp(x), mod(x), atol=1e-5)
    prog = torch.onnx.export(exp, (x,), dynamo=True, report=False, optimize=True,
                             custom_translation_table={**rocket_table(), **custom_translation_table()})
    model = prog.model
    lower_rocket_nodes(model, merge="never")
    ops = {n.op_type for n in model.graph}
    assert ("MatMulNBits" in ops) == (scheme == "int4")
    y = _run(ir.to_proto(model).SerializeToString(), x.numpy())
    np.testing.assert_allclose(y, mod(x).detach().numpy(), atol=2e-5, rtol=1e-5)
    inits = {v.dtype for v in model.graph.initializers.values()}
    assert ir.DataType.UINT8 in inits or ir.DataType.INT8 in inits           # stays 1-byte / 4-bit in the file
