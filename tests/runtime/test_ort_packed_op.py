"""The ONNX Runtime CPU custom-op library (plugins_ort/rocket_ort_ops.cc) for ``rocket.RocketSparseVMatMul`` and
``rocket.RocketMatMulF16``: both kernels against a float64 reference through a real ORT session over a grid of
shapes (AVX2 and scalar paths), the skip policy for non-finite activations in unkept rows, the contract's
attributes, and trt-target / ort-packed-target exports of a tiny Llama run by OrtEngine on the CPU: the same greedy
tokens as TorchEngine, with the ort-packed graph's weights fp16."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rocket_deploy.onnx_contract import (F16_MATMUL_OP, ONNX_DOMAIN, ONNX_OP, ORT_TRT_PLUGIN_DOMAIN, PLUGIN_NAMESPACE,
                                         PLUGIN_VERSION)
from rocket_deploy.runtime import ort_custom_ops
from rocket_deploy.sparse_format import pack_v, unpack_v

from _rocket_fixtures import make_artifact, random_sparse_v

_WHY = ort_custom_ops.build_problem()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"ORT custom-op library cannot be built: {_WHY}")
NEVER = (10 ** 9,)


@pytest.fixture(scope="module")
def lib():
    return ort_custom_ops.library_path()


def _graph(values: np.ndarray, mask: np.ndarray, rank: int, keep: int, d_out: int, domain: str = ONNX_DOMAIN,
           t_dim="rank"):
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node(ONNX_OP, ["t", "values", "mask"], ["y"], domain=domain, rank=rank, keep=keep,
                            out_features=d_out, value_type=0, plugin_version=PLUGIN_VERSION,
                            plugin_namespace=PLUGIN_NAMESPACE)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, None, rank if t_dim == "rank" else None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, d_out])],
                          [numpy_helper.from_array(values, "values"), numpy_helper.from_array(mask, "mask")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])


def _session(model, lib, threads=2):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _case(r, d_out, k, vdtype, seed=0, empty_cols=False):
    v, keep = random_sparse_v(r, d_out, k, seed)
    v = v.half().float()
    if empty_cols:                                   # columns whose kept values are all zero
        v[:, ::3] = 0
    vals, mask = pack_v(v, keep)
    return vals.numpy().astype(vdtype), mask.numpy(), v.double().numpy()


SHAPES = [(1, 37, 19, 5), (3, 64, 48, 64), (17, 30, 33, 1), (1, 16, 16, 15), (3, 95, 200, 47), (17, 8, 7, 8),
          (1, 300, 576, 150)]


@pytest.mark.parametrize("scalar", [False, True])
def test_kernel_matches_float64_reference(lib, scalar):
    # each path in a fresh process: the AVX2 / scalar choice is made once per kernel from the environment
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
import numpy as np
from test_ort_packed_op import _case, _graph, _session, SHAPES
for (m, r, d, k) in SHAPES:
    for vd in (np.float16, np.float32):
        for empty in (False, True):
            vals, mask, dense = _case(r, d, k, vd, seed=r + d, empty_cols=empty)
            s = _session(_graph(vals, mask, r, k, d), {lib!r})
            for lead in ((m, 2), (1, m)):          # 2m rows, then m rows (register blocks of 4 rows + the rest)
                t = np.random.default_rng(m).standard_normal((*lead, r)).astype(np.float32)
                y = s.run(None, {{"t": t}})[0]
                ref = t.astype(np.float64) @ dense
                assert y.shape == (*lead, d), y.shape
                err = np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30)
                assert err < 1e-5, (m, r, d, k, vd, empty, err)
print("ok")
"""
    env = dict(os.environ, ROCKET_ORT_SCALAR="1" if scalar else "0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


def _mm_graph(w16: np.ndarray, domain: str = ONNX_DOMAIN):
    from onnx import TensorProto, helper, numpy_helper
    n, k = w16.shape
    node = helper.make_node(F16_MATMUL_OP, ["x", "w"], ["y"], domain=domain, in_features=k, out_features=n)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, n])],
                          [numpy_helper.from_array(w16, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])


# (rows, in_features, out_features): 1 row (decode), 2-7 rows (the 3-row blocks + rest), K not a multiple of 8 / 32,
# N not a multiple of 4, and the lm_head-like wide case.
MM_SHAPES = [(1, 1, 1), (1, 7, 3), (2, 8, 4), (3, 9, 5), (4, 17, 13), (5, 576, 192), (7, 64, 1537), (1, 33, 9),
             (1, 40, 6), (64, 576, 100), (1, 1536, 576), (6, 100, 4100)]


@pytest.mark.parametrize("scalar", [False, True])
def test_f16_matmul_matches_float64_reference(lib, scalar):
    code = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); sys.path.insert(0, {os.path.dirname(os.path.dirname(__file__))!r})
import numpy as np
from test_ort_packed_op import _mm_graph, _session, MM_SHAPES
worst = 0.0
for (m, k, n) in MM_SHAPES:
    rng = np.random.default_rng(m * 1000 + k + n)
    w = rng.standard_normal((n, k)).astype(np.float16)
    s = _session(_mm_graph(w), {lib!r})
    x = rng.standard_normal((1, m, k)).astype(np.float32)
    y = s.run(None, {{"x": x}})[0]
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert y.shape == (1, m, n) and y.dtype == np.float32, (y.shape, y.dtype)
    err = np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30)
    worst = max(worst, err)
    assert err < 1e-5, (m, k, n, err)
print("ok", worst)
"""
    env = dict(os.environ, ROCKET_ORT_SCALAR="1" if scalar else "0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


def test_f16_matmul_bad_input(lib):
    w = np.ones((4, 8), np.float16)
    s = _session(_mm_graph(w), lib)
    with pytest.raises(Exception, match="last dim must equal in_features"):
        s.run(None, {"x": np.ones((1, 1, 7), np.float32)})
    from onnx import helper
    bad = _mm_graph(w)
    bad.graph.node[0].attribute[1].CopyFrom(helper.make_attribute("out_features", 5))
    with pytest.raises(Exception, match=r"w must be float16 \[out_features, in_features\]"):
        _session(bad, lib).run(None, {"x": np.ones((1, 1, 8), np.float32)})


def test_unkept_nonfinite_rows_are_skipped_and_kept_ones_propagate(lib):
    r, d, k = 24, 10, 6
    vals, mask, dense = _case(r, d, k, np.float16)
    s = _session(_graph(vals, mask, r, k, d), lib)
    kept = unpack_v(torch.ones(d, k), torch.from_numpy(mask), r).numpy() > 0      # r x d
    t = np.random.default_rng(0).standard_normal((1, 1, r)).astype(np.float32)
    col0_unkept = int(np.where(~kept[:, 0])[0][0])
    t[0, 0, col0_unkept] = np.inf
    y = s.run(None, {"t": t})[0][0, 0]
    hit = kept[col0_unkept]                          # columns that keep that row see inf / nan, the others not
    assert np.all(np.isfinite(y[~hit])) and not np.any(np.isfinite(y[hit]))
    ref = np.where(kept, dense, 0)[np.arange(r) != col0_unkept].T @ t[0, 0][np.arange(r) != col0_unkept]
    np.testing.assert_allclose(y[~hit], ref[~hit], rtol=1e-5, atol=1e-5)
    # an inf fp16 value propagates like the reference product
    vals2 = vals.copy()
    vals2[2, 0] = np.float16(np.inf)
    y2 = _session(_graph(vals2, mask, r, k, d), lib).run(None, {"t": np.ones((1, 1, r), np.float32)})[0][0, 0]
    assert np.isinf(y2[2]) and np.all(np.isfinite(np.delete(y2, 2)))


def test_both_plugin_domains_and_bad_input(lib):
    vals, mask, dense = _case(16, 8, 4, np.float16)
    t = np.ones((1, 1, 16), np.float32)
    a = _session(_graph(vals, mask, 16, 4, 8, ORT_TRT_PLUGIN_DOMAIN), lib).run(None, {"t": t})[0]
    np.testing.assert_allclose(a[0, 0], dense.sum(axis=0), rtol=1e-5)
    s = _session(_graph(vals, mask, 16, 4, 8, t_dim=None), lib)
    with pytest.raises(Exception, match="last dim must equal rank"):
        s.run(None, {"t": np.ones((1, 1, 15), np.float32)})


def test_missing_library_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("ROCKET_ORT_OPS_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(ort_custom_ops.OrtOpsUnavailable, match="does not exist"):
        ort_custom_ops.library_path()
    monkeypatch.delenv("ROCKET_ORT_OPS_LIB")
    monkeypatch.setenv("ROCKET_ORT_INCLUDE", str(tmp_path))
    monkeypatch.setattr(ort_custom_ops, "_ROOT", str(tmp_path))
    with pytest.raises(ort_custom_ops.OrtOpsUnavailable, match="make ort-headers"):
        ort_custom_ops.library_path()


def test_trt_graph_on_ort_cpu_matches_torch_greedy(lib, tmp_path, tiny_tok):
    from rocket_deploy.export import export_artifact
    from rocket_deploy.runtime import SamplingParams
    from rocket_deploy.runtime.ort_backend import OrtEngine
    from rocket_deploy.runtime.torch_backend import TorchEngine
    from rocket_deploy.testing import tiny_llama
    art = make_artifact(tiny_llama(seed=5), tiny_tok, str(tmp_path / "art"))
    res = export_artifact(art, str(tmp_path / "onnx"), target="trt", validate=False)
    assert ort_custom_ops.graph_uses_op(res.path)
    te = TorchEngine.from_path(art, device="cpu")
    oe = OrtEngine(res.path, providers=["CPUExecutionProvider"], threads=1)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=NEVER)
    for prompt in ("def parse(self, text):", "Return the number of"):
        a, b = te.generate(prompt, params=params), oe.generate(prompt, params=params)
        assert len(a.token_ids) == 20 and a.token_ids == b.token_ids, prompt


def test_ort_packed_graph_on_ort_cpu_matches_torch_greedy(lib, tmp_path, tiny_tok):
    # the ort-packed export (validated through its standard-op copy) keeps every MatMul weight fp16 and runs on the
    # library: the same greedy tokens as the torch model
    import onnx
    from rocket_deploy.export import export_artifact
    from rocket_deploy.runtime import SamplingParams
    from rocket_deploy.runtime.ort_backend import OrtEngine
    from rocket_deploy.runtime.torch_backend import TorchEngine
    from rocket_deploy.testing import tiny_llama
    art = make_artifact(tiny_llama(seed=5), tiny_tok, str(tmp_path / "art"))
    res = export_artifact(art, str(tmp_path / "onnx"), target="ort-packed")
    assert res.validation["passed"] and "ort-packed" in res.validation["validated_graph"]
    assert os.path.isfile(os.path.join(os.path.dirname(res.path), "model.onnx.data"))   # always external data
    st = res.stats["ort_packed"]
    # every U, the lm_head, and the dense V's (keep == rank: half the fixture's layers) are RocketMatMulF16
    assert st["dense_v_f16"] == res.stats["rocket_layers"] // 2 and st["fp16_gather"] == 1, st
    assert st["f16_matmul"] == res.stats["rocket_layers"] + 1 + st["dense_v_f16"], st
    assert st["fp16_v_values"] == res.stats["rocket_layers"] - st["dense_v_f16"], st
    m = onnx.load(res.path)
    inits = {i.name: i for i in m.graph.initializer}
    assert not [n.name for n in m.graph.node if n.domain == "" and n.op_type in ("MatMul", "Transpose") and
                any(i in inits for i in n.input)]               # no fp32 weight left for ORT to fold or multiply
    for n in m.graph.node:
        if n.op_type == F16_MATMUL_OP:
            assert inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert ort_custom_ops.graph_uses_op(res.path)
    te = TorchEngine.from_path(art, device="cpu")
    oe = OrtEngine(res.path, providers=["CPUExecutionProvider"], threads=1)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=NEVER)
    for prompt in ("def parse(self, text):", "Return the number of"):
        a, b = te.generate(prompt, params=params), oe.generate(prompt, params=params)
        assert len(a.token_ids) == 20 and a.token_ids == b.token_ids, prompt
