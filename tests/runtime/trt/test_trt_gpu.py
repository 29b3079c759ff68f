"""Real TensorRT on a GPU: a MatMul engine, the tiny KV-cache decoder through ``forward`` and ``stream_tokens``, and
the ``RocketSparseVMatMul`` plugin on the node the exporter writes, against numpy. Marked ``tensorrt`` + ``gpu``;
skipped cleanly where ``import tensorrt`` fails or no GPU is visible."""
from __future__ import annotations

import numpy as np
import pytest
from _trt_graphs import VOCAB, past_from_present, reference_decoder, rocket_layer_onnx, tiny_decoder, tiny_matmul

from rocket_deploy.runtime.trt import (PLUGIN_BUILD_COMMAND, PluginLibraryNotFound, ShapeRanges, TensorRTUnavailable,
                                       TrtEngine, TrtKVCache, build_engine, find_plugin_library, import_tensorrt,
                                       position_ids_from_mask, read_plan_metadata)


def _need_trt_gpu():
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(str(e))
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
    plan = build_engine(onnx_path, tmp_path / "mm.plan", ranges, timing_cache=cache, workspace_gb=1,
                        builder_optimization_level=0, progress=False)
    assert plan.stat().st_size > 0 and cache.stat().st_size > 0
    meta = read_plan_metadata(plan)
    assert meta["profile"]["x"] == [[1, 1, 16], [2, 4, 16], [4, 8, 16]] and not meta["decoder"]
    eng = TrtEngine(plan)
    assert eng.model_bytes() == plan.stat().st_size
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(eng.run({"x": x})["y"], x @ w, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="batch size 5"):
        eng.run({"x": np.zeros((5, 1, 16), np.float32)})
    # the timing cache is reused on a rebuild
    build_engine(onnx_path, tmp_path / "mm2.plan", ranges, timing_cache=cache, builder_optimization_level=0,
                 progress=False)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_decoder_kv_cache_protocol(tmp_path):
    _need_trt_gpu()
    from rocket_deploy.runtime import SamplingParams, open_engine
    onnx_path = tiny_decoder(tmp_path / "model.onnx")
    plan = tmp_path / "model.plan"
    build_engine(onnx_path, plan, ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16),
                 builder_optimization_level=0, progress=False)
    eng = open_engine(plan)
    assert isinstance(eng, TrtEngine) and eng.is_decoder and eng.max_context == 16
    ids = np.array([[3, 5, 7], [1, 2, 4]], np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    logits, past = eng.forward(ids, mask, None)
    ref, ref_present = reference_decoder(ids, mask, position_ids_from_mask(mask, 3), None)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3)
    assert past.length == 3
    for step in range(3):
        nxt = np.array([[9 + step], [11 + step]], np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        ref_past = past_from_present(ref_present)
        ref, ref_present = reference_decoder(nxt, mask, position_ids_from_mask(mask, 1), ref_past)
        logits, past = eng.forward(nxt, mask, past)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(past.tensors["past_key_values.1.value"].cpu().numpy(),
                                   ref_present["present.1.value"], rtol=1e-5, atol=1e-5)
    # longer than the engine was built for
    long_mask = np.ones((1, 17), np.int64)
    with pytest.raises(ValueError, match="longer than the max the engine was built for"):
        eng.forward(np.ones((1, 1), np.int64), long_mask, TrtKVCache({}, 16, 1))
    # generation on top of forward
    out = list(eng.stream_tokens([1, 2, 3], SamplingParams(max_new_tokens=5, stop_token_ids=(10 ** 6,))))
    assert len(out) == 5 and all(0 <= t < VOCAB for t in out)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_trt_rocket_sparse_plugin_matches_numpy(tmp_path):
    _need_trt_gpu()
    try:
        lib = find_plugin_library()
    except PluginLibraryNotFound as e:
        pytest.skip(str(e))
    if lib is None:
        pytest.skip("librocket_trt_plugins.so is not built (" + PLUGIN_BUILD_COMMAND + ")")
    path, (u, dense_v, bias) = rocket_layer_onnx(tmp_path / "rocket.onnx")      # the exporter's own node
    d_in = u.shape[0]
    ranges = ShapeRanges(overrides={"x": ((1, d_in), (16, d_in), (64, d_in))})
    plan = build_engine(path, tmp_path / "rocket.plan", ranges, builder_optimization_level=0, progress=False)
    assert read_plan_metadata(plan)["uses_plugin"]
    eng = TrtEngine(plan)
    x = np.random.default_rng(2).standard_normal((37, d_in)).astype(np.float32)
    np.testing.assert_allclose(eng.run({"x": x})["y"], x @ u @ dense_v + bias, rtol=1e-3, atol=1e-3)
