"""Quantized layers (export/quant_ops.py, quant_ort.py, stand_ins.py) exported through the real export path and run in
ONNX Runtime against the torch modules and their dequantized weights."""
import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from rocket_deploy.compress.factorize import eigenbasis, factorize  # noqa: E402
from rocket_deploy.compress.quantize import quantize_dense, quantize_factors, quantize_matrix  # noqa: E402
from rocket_deploy.export.driver import LAYER_INPUT, export_layer  # noqa: E402
from rocket_deploy.export.quant_ops import custom_translation_table, fp8_e4m3fn_table  # noqa: E402
from rocket_deploy.export.stand_ins import export_module_for  # noqa: E402
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


# kind -> (format, export options, op that must be in the graph, op that must not)
LAYER_KINDS = {"int8-cast": ("int8", {}, "Cast", "DequantizeLinear"),
               "int8-dq-fused": ("int8", {"int8_compute": "dynamic"}, "DequantizeLinear", "Cast"),
               "fp8-lut": ("fp8", {}, "Gather", "DequantizeLinear"),
               "int4-nbits": ("int4", {"int4_accuracy_level": 0}, "MatMulNBits", "DequantizeLinear"),
               "int4-nbits-acc4": ("int4", {"int4_accuracy_level": 4}, "MatMulNBits", "DequantizeLinear")}


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_layer_graphs_match_dequantized_weight(kind):
    """One QuantDenseLinear exported by export_layer (the stand-ins, translations, optimizer and ort passes of
    export_model): the graph holds the expected block, keeps the codes, and computes x @ dequantized W."""
    import onnx_ir as ir
    fmt, opts, must, must_not = LAYER_KINDS[kind]
    torch.manual_seed(0)
    k, n = 200, 48                        # K not a multiple of the int4 block: padded last block
    w = torch.randn(k, n) / 10
    qm = quantize_matrix(w, fmt, None, 64)
    mod = QuantDenseLinear.from_quantized(qm)
    x = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    model, info = export_layer(mod, torch.from_numpy(x), **opts)
    ops = {nd.op_type for nd in model.graph}
    assert must in ops and must_not not in ops, ops
    assert [v.name for v in model.graph.inputs] == [LAYER_INPUT]
    codes = {ir.DataType.INT8, ir.DataType.UINT8}
    assert any(v.dtype in codes for v in model.graph.initializers.values())          # 1-byte / 4-bit codes stay
    y = _run(ir.to_proto(model).SerializeToString(), x)
    ref = x @ qm.deq.numpy()
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    if info["quantization"]["activations_quantized"]:         # activations quantized at run time: approximate
        assert kind in ("int8-dq-fused", "int4-nbits-acc4") and 1e-5 < rel < 0.03
    else:
        assert rel < 1e-5


def test_export_layer_plain_and_errors():
    """A plain nn.Linear takes the same path (fp32 MatMul graph); bad options are refused by name."""
    import onnx_ir as ir
    from rocket_deploy.export import ExportError
    lin = torch.nn.Linear(16, 8).eval()
    x = torch.randn(3, 4, 16)
    model, info = export_layer(lin, x)
    assert info["quantization"] == {} and info["rocket_nodes"] == 0
    np.testing.assert_allclose(_run(ir.to_proto(model).SerializeToString(), x.numpy()),
                               lin(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ExportError, match="trt only"):
        export_layer(lin, x, plugin_domain="trt.plugins")
    with pytest.raises(ValueError, match="example"):
        export_layer(lin, torch.randn(16))


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
