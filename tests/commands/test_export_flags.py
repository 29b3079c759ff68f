"""``rocket-deploy export`` flags of issue 13: --opset (checked against the exporter's range), --device, --dtype bf16
(validated through an fp32 copy of the same graph against torch in bf16: ONNX Runtime CPU has no bf16 kernels),
--atol / --rtol, the progress lines on stderr and --quiet. Exports are slow: two small ones, the rest is checked
without exporting."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from rocket_deploy.cli import main
from rocket_deploy.export.options import ExportError, ExportOptions, quant_export_settings, supported_opsets
from rocket_deploy.export.validate import TOLERANCES, tolerance_for, upcast_bf16, validate_export
from rocket_deploy.testing import tiny_llama

from _rocket_fixtures import make_artifact, quantize_rocketized, rocketize


def run(args):
    return CliRunner().invoke(main, args)


def last_json(res):
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory, tiny_tok):
    return make_artifact(tiny_llama(hidden=32, layers=1), tiny_tok, str(tmp_path_factory.mktemp("flags") / "art"))


def test_option_errors_before_any_work(small_artifact, tmp_path):
    out = str(tmp_path / "x")
    hi = supported_opsets().stop - 1
    for args, needle in ((["--opset", "17"], f"use 18..{hi}"), (["--opset", str(hi + 1)], f"use 18..{hi}"),
                         (["--atol", "-1"], "--atol"), (["--rtol", "nan"], "--rtol"), (["--device", "tpu"], "--device"),
                         (["--dtype", "int8"], "--dtype")):
        res = run(["export", small_artifact, "--out", out, *args])
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output and "Traceback" not in res.output, (args, res.output)
    if not torch.cuda.is_available():
        res = run(["export", small_artifact, "--out", out, "--device", "cuda"])
        assert res.exit_code == 2 and "--device cuda needs a CUDA GPU" in res.output and "--device cpu" in res.output
    assert not os.path.exists(out)


def test_export_options_library():
    assert supported_opsets().start == 18 and 21 in supported_opsets()
    opts = ExportOptions(dtype="bf16", opset=21, atol=0.5)
    assert opts.torch_dtype == torch.bfloat16 and opts.graph_opset == 21
    for kw, needle in ((dict(opset=17), "--opset 17"), (dict(opset=True), "--opset True"), (dict(rtol=-0.1), "--rtol"),
                       (dict(merge="sometimes"), "merge"), (dict(device="mps"), "device")):
        with pytest.raises(ExportError, match=needle):
            ExportOptions(**kw)
    assert tolerance_for("bf16") == TOLERANCES["bf16"] and tolerance_for("fp16", atol=0.1) == {"atol": 0.1,
                                                                                                  "rtol": 3e-2}
    assert "kl" in tolerance_for("fp32", act_quant=True) and "kl" not in tolerance_for("fp32", rtol=1, act_quant=True)


def test_bf16_refused_for_quantized_models(tiny_tok):
    model = tiny_llama(hidden=32, layers=1)
    quantize_rocketized(model, rocketize(model), "int8")
    with pytest.raises(ExportError, match="bf16 is not supported for quantized"):
        quant_export_settings(model, "ort", "bf16")


def test_upcast_bf16_is_exact_and_runs_in_onnxruntime():
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    w_bf16 = torch.from_numpy(w).bfloat16()
    init = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, w_bf16.view(torch.int16).numpy().tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("MatMul", ["xb", "w"], ["yb"]),
         helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [init])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert upcast_bf16(model) == 2          # the initializer and the first Cast's `to` (no value types here)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w_bf16.float().numpy(), rtol=1e-6, atol=1e-6)


def test_cli_bf16_export_progress_and_validation(small_artifact, tmp_path):
    out = tmp_path / "bf16"
    res = run(["export", small_artifact, "--out", str(out), "--dtype", "bf16", "--json"])
    assert res.exit_code == 0, res.output
    j = last_json(res)
    assert j["dtype"] == "bf16" and j["validated"] and j["passed"] and 0 < j["max_rel"] < TOLERANCES["bf16"]["rtol"]
    for stage in ("loading the artifact", "tracing with torch.onnx.export (dynamo, opset 18, bfloat16",
                  "optimising the graph", "lowering the custom op", "stripping the exporter's per-node metadata",
                  "saving model.onnx", "onnx.checker", "cannot run bfloat16", "validation: prefill (empty past)",
                  "validation: decode (past 7)"):
        assert stage in res.stderr, stage
    info = json.load(open(out / "export.json"))
    v = info["validation"]
    assert v["tolerance"] == TOLERANCES["bf16"] and "fp32 copy of the bf16 graph" in v["validated_graph"]
    assert "reference: torch in bfloat16" in v["validated_graph"]
    m = onnx.load(str(out / "model.onnx"))
    matrices = {i.data_type for i in m.graph.initializer if len(i.dims) == 2 and i.data_type in (1, 10, 16)}
    assert matrices == {onnx.TensorProto.BFLOAT16}     # every weight matrix stored (and computed) in bf16
    fp32 = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all(int(np.prod(i.dims)) <= 8 for i in fp32)  # only what transformers computes in fp32 on purpose
    # (RMSNorm's exponent / eps, the rotary inv_freq), as torch does in bf16 too
    logits = next(o for o in m.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16


def test_cli_opset_tolerances_quiet(small_artifact, tmp_path):
    out = tmp_path / "op21"
    res = run(["export", small_artifact, "--out", str(out), "--target", "trt", "--opset", "21", "--atol", "1e-3",
               "--rtol", "0", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    assert "[export" not in res.stderr                 # --quiet: no progress lines
    j = last_json(res)
    assert j["opset"] == 21 and j["passed"]
    m = onnx.load(str(out / "model.onnx"))
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    v = json.load(open(out / "export.json"))["validation"]
    assert v["tolerance"] == {"atol": 1e-3, "rtol": 0.0} and v["tolerance_source"] == "--atol / --rtol"
    from rocket_deploy import load_artifact
    model = load_artifact(small_artifact, dtype=torch.float32)[0]
    with pytest.warns(UserWarning, match="EXPORT VALIDATION FAILED"):          # a zero bound: fp32 rounding fails it
        rep = validate_export(str(out / "model.onnx"), model, target="trt", atol=0, rtol=0)
    assert not rep["passed"] and rep["tolerance"] == {"atol": 0.0, "rtol": 0.0}


@pytest.mark.gpu
def test_cli_export_on_cuda(small_artifact, tmp_path):
    res = run(["export", small_artifact, "--out", str(tmp_path / "cuda"), "--device", "cuda", "--dtype", "fp16",
               "--json"])
    assert res.exit_code == 0, res.output
    assert last_json(res)["passed"] and "on cuda" in res.stderr
