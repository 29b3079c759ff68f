"""TrtEngine (runtime/trt/engine.py) against the fake TensorRT runtime: the KV-cache protocol of ``forward`` (empty
past on prefill, ``present`` -> ``past`` on the device, position ids from the mask), generation on top of it, an
encoder, raw ``run``, and the errors that name the build option to change. Tensors live in CPU memory; the fake
reads and writes them through the addresses the engine binds, as TensorRT does on a GPU."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from _trt_graphs import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, past_from_present, reference_decoder, tiny_encoder
from fake_tensorrt import no_plugin  # noqa: F401 -- fixture
from fake_tensorrt import PLAN_BLOB, FakeEngine, install_runtime

from rocket_deploy.onnx_contract import LOGITS, decoder_io_names, past_names
from rocket_deploy.runtime.trt import (ShapeRanges, TrtEngine, TrtKVCache, plan_metadata_path, position_ids_from_mask,
                                       trt_dtype_to_torch)


def _decoder_engine(profile) -> FakeEngine:
    """The engine TensorRT would build from :func:`tiny_decoder`, computing :func:`reference_decoder`."""
    ins, outs = decoder_io_names(LAYERS)
    kv = (-1, KV_HEADS, -1, HEAD_DIM)
    io = {n: ("INPUT", "FLOAT", kv) if n in past_names(LAYERS) else ("INPUT", "INT64", (-1, -1)) for n in ins}
    io.update({n: ("OUTPUT", "FLOAT", (-1, -1, VOCAB) if n == LOGITS else kv) for n in outs})

    def compute(x):
        past = {n: x[n] for n in past_names(LAYERS)}
        logits, present = reference_decoder(x["input_ids"], x["attention_mask"], x["position_ids"], past)
        return {LOGITS: logits, **present}

    return FakeEngine(io, profile, compute)


@pytest.fixture
def fake_trt_engine(monkeypatch, tmp_path, decoder_onnx, no_plugin):
    """A plan of the tiny decoder (batch 1..2, 1..8 new tokens, context 16) and the engines deserialized from it."""
    profile = ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16).profile(decoder_onnx)
    plan = tmp_path / "model.plan"
    plan.write_bytes(PLAN_BLOB)
    plan_metadata_path(plan).write_text(json.dumps({"max_context": 16, "tensorrt_version": "10.3.0",
                                                    "uses_plugin": False, "onnx": str(decoder_onnx)}))
    engines = install_runtime(monkeypatch, lambda: _decoder_engine(profile))
    return plan, engines


def test_tiny_decoder_matches_reference_in_onnxruntime(decoder_onnx):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(decoder_onnx), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 5, 7], [1, 2, 4]], np.int64)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    pos = position_ids_from_mask(mask, 3)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for name in past_names(LAYERS):
        feeds[name] = np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32)  # empty past
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    ref_logits, ref_present = reference_decoder(ids, mask, pos, None)
    np.testing.assert_allclose(outs["logits"], ref_logits, rtol=1e-5, atol=1e-4)
    # one decode step on top of that past
    past = past_from_present(ref_present)
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    ids2 = np.array([[9], [11]], np.int64)
    feeds2 = {"input_ids": ids2, "attention_mask": mask2, "position_ids": position_ids_from_mask(mask2, 1), **past}
    outs2 = dict(zip(names, sess.run(None, feeds2)))
    ref2, _ = reference_decoder(ids2, mask2, feeds2["position_ids"], past)
    np.testing.assert_allclose(outs2["logits"], ref2, rtol=1e-5, atol=1e-4)
    assert outs2["present.1.value"].shape == (2, KV_HEADS, 4, HEAD_DIM)


def test_position_ids_from_mask():
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask, 4), [[0, 1, 2, 3], [1, 1, 0, 1]])
    np.testing.assert_array_equal(position_ids_from_mask(mask, 1), [[3], [1]])
    assert position_ids_from_mask(mask, 2).dtype == np.int64


def test_trt_dtype_to_torch():
    torch = pytest.importorskip("torch")
    assert trt_dtype_to_torch("HALF") is torch.float16
    assert trt_dtype_to_torch(types.SimpleNamespace(name="INT64")) is torch.int64
    assert trt_dtype_to_torch("DataType.BF16") is torch.bfloat16
    with pytest.raises(TypeError, match="INT4"):
        trt_dtype_to_torch("INT4")


def test_trt_engine_kv_protocol_with_fake_runtime(fake_trt_engine):
    from rocket_deploy.runtime import SamplingParams, open_engine
    plan, engines = fake_trt_engine
    eng = open_engine(plan)
    assert isinstance(eng, TrtEngine) and eng.is_decoder and eng.max_context == 16
    assert eng.past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert eng.model_bytes() == len(PLAN_BLOB)
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
        ref_past = past_from_present(ref_present)
        ref, ref_present = reference_decoder(nxt, mask, position_ids_from_mask(mask, 1), ref_past)
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
    eng = TrtEngine(plan)
    runs = lambda: engines[0].context.runs  # noqa: E731
    with pytest.raises(ValueError, match=r"longer than the max the engine was built for \(16; --max-context\)"):
        eng.forward(np.ones((1, 1), np.int64), np.ones((1, 17), np.int64), TrtKVCache({}, 16, 1))
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
    plan_metadata_path(bad).write_text(json.dumps({"tensorrt_version": "10.3.0"}))
    with pytest.raises(RuntimeError, match="built with TensorRT 10.3.0 and this is TensorRT 10.8.0"):
        TrtEngine(bad)
    with pytest.raises(FileNotFoundError, match="no TensorRT plan"):
        TrtEngine(tmp_path / "missing.plan")


def test_trt_engine_encoder_with_fake_runtime(monkeypatch, tmp_path, no_plugin):
    """An encoder plan: no KV cache, ``forward`` returns ``last_hidden_state`` as float32 and no state."""
    emb = np.random.default_rng(1).standard_normal((VOCAB, 16)).astype(np.float32)   # tiny_encoder's weights
    profile = ShapeRanges.parse(batch="1:1:2", seq="1:4:8").profile(tiny_encoder(tmp_path / "e.onnx"))
    io = {"input_ids": ("INPUT", "INT64", (-1, -1)), "attention_mask": ("INPUT", "INT64", (-1, -1)),
          "last_hidden_state": ("OUTPUT", "FLOAT", (-1, -1, 16))}
    compute = lambda x: {"last_hidden_state": emb[x["input_ids"]] * x["attention_mask"][..., None]}  # noqa: E731
    install_runtime(monkeypatch, lambda: FakeEngine(io, profile, compute))
    plan = tmp_path / "e.plan"
    plan.write_bytes(PLAN_BLOB)
    eng = TrtEngine(plan)
    assert not eng.is_decoder and eng.max_context is None and eng.past_names == []
    ids, mask = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 1, 1], [0, 1, 1]])
    hidden, state = eng.forward(ids, mask, None)
    assert state is None and hidden.dtype == np.float32
    np.testing.assert_allclose(hidden, emb[ids] * mask[..., None])
    with pytest.raises(ValueError, match=r"9 new tokens per call .*\(--seq\)"):
        eng.forward(np.ones((1, 9), np.int64), np.ones((1, 9), np.int64), None)
