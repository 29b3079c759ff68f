"""TrtEngine decode under CUDA graphs (runtime/trt/engine.py: TrtStaticKV), against the fake TensorRT runtime and a
fake graph backend: the static past gives the logits of the eager, concatenating path; one capture per shape
(batch, static past length), a replay per step, a new capture when the past doubles, eager once the profile's
longest past is reached; a failed capture falls back once; the switch; plans that cannot take a static past. The
fake graph, like a real capture, runs nothing when capturing and the recorded step (execute_async_v3 on the bound
addresses + the key / value copy) on each replay. Real TensorRT on a GPU: the last test."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _trt_graphs import HEAD_DIM, KV_HEADS, LAYERS, VOCAB, reference_decoder, tiny_decoder
from _trt_graphs import decoder_onnx  # noqa: F401 -- fixture
from fake_tensorrt import no_plugin  # noqa: F401 -- fixture
from fake_tensorrt import PLAN_BLOB, FakeEngine, install_runtime
from fake_cuda_graphs import FakeGraphs

from rocket_deploy.onnx_contract import LOGITS, POSITION_IDS, decoder_io_names, past_names
from rocket_deploy.runtime.cuda_graphs import StepGraphs
from rocket_deploy.runtime.trt import ShapeRanges, TrtEngine, TrtKVCache, plan_metadata_path, position_ids_from_mask
from rocket_deploy.runtime.trt import engine as trt_engine


def _decoder_engine(profile, drop=()) -> FakeEngine:
    ins, outs = decoder_io_names(LAYERS)
    kv = (-1, KV_HEADS, -1, HEAD_DIM)
    io = {n: ("INPUT", "FLOAT", kv) if n in past_names(LAYERS) else ("INPUT", "INT64", (-1, -1))
          for n in ins if n not in drop}
    io.update({n: ("OUTPUT", "FLOAT", (-1, -1, VOCAB) if n == LOGITS else kv) for n in outs})

    def compute(x):
        past = {n: x[n] for n in past_names(LAYERS)}
        logits, present = reference_decoder(x["input_ids"], x["attention_mask"], x["position_ids"], past)
        return {LOGITS: logits, **present}

    return FakeEngine(io, {k: v for k, v in profile.items() if k not in drop}, compute)


@pytest.fixture
def plan(monkeypatch, tmp_path, decoder_onnx, no_plugin):
    """A plan of the tiny decoder (batch 1..2, 1..8 new tokens, context 16); returns (plan, engines, contexts)."""
    profile = ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16).profile(decoder_onnx)
    p = tmp_path / "model.plan"
    p.write_bytes(PLAN_BLOB)
    plan_metadata_path(p).write_text(json.dumps({"max_context": 16, "tensorrt_version": "10.3.0",
                                                 "uses_plugin": False, "onnx": str(decoder_onnx)}))
    contexts = []
    engines = install_runtime(monkeypatch, lambda: _decoder_engine(profile))
    orig = FakeEngine.create_execution_context

    def create(self):
        contexts.append(orig(self))
        return contexts[-1]
    monkeypatch.setattr(FakeEngine, "create_execution_context", create)
    return p, engines, contexts


def _graphed(plan_path, fake, **kw):
    eng = TrtEngine(plan_path, cuda_graphs=True, **kw)
    eng._graphs = StepGraphs(fake, True)
    return eng


def _decode(eng, ids, mask, steps):
    """Decode fixed tokens: the logits of every call, and the past after each with its static length then (None:
    not static)."""
    logits, past = eng.forward(ids, mask, None)
    out, pasts = [logits], [(past, getattr(getattr(past, "slot", None), "length", None))]
    for step in range(steps):
        nxt = np.full((ids.shape[0], 1), 3 + step, np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = eng.forward(nxt, mask, past)
        out.append(logits)
        pasts.append((past, getattr(getattr(past, "slot", None), "length", None)))
    return out, pasts


def _reference(ids, mask, steps):
    logits, present = reference_decoder(ids, mask, position_ids_from_mask(mask, ids.shape[1]), None)
    out = [logits]
    for step in range(steps):
        nxt = np.full((ids.shape[0], 1), 3 + step, np.int64)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        past = {n.replace("present", "past_key_values"): v for n, v in present.items()}
        logits, present = reference_decoder(nxt, mask, position_ids_from_mask(mask, 1), past)
        out.append(logits)
    return out


def test_graph_decode_matches_eager_capture_once_replay_per_step(plan):
    path, engines, contexts = plan
    ids, mask = np.array([[3, 5, 7], [1, 2, 4]], np.int64), np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    eager = TrtEngine(path, cuda_graphs=False)
    assert not eager.cuda_graphs and eager.graph_stats["cuda_graphs"] == "off"
    want, pasts = _decode(eager, ids, mask, 12)
    assert all(isinstance(p, TrtKVCache) for p, _ in pasts)
    fake = FakeGraphs()
    eng = _graphed(path, fake)
    n_ctx = len(contexts)
    got, gpasts = _decode(eng, ids, mask, 12)
    for a, b, r in zip(got, want, _reference(ids, mask, 12)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-4)
    # context 16: the static past is 15 long (the longest the profile takes) -> 3 prompt tokens, decode at 3..14
    assert fake.log == ["eager", "capture"] + ["replay"] * 11
    assert eng.graph_stats == {"captures": 1, "replays": 11, "eager_steps": 1, "capture_failures": 0,
                               "cuda_graphs": None}
    assert len(contexts) == n_ctx + 1                                  # one context for the slot, bound once
    slot_ctx = contexts[-1]
    assert slot_ctx.shapes["past_key_values.0.key"] == (2, KV_HEADS, 15, HEAD_DIM)
    assert slot_ctx.shapes["attention_mask"] == (2, 16) and slot_ctx.runs == 12
    last = gpasts[-1][0]
    assert last.length == 15 and last.batch == 2
    np.testing.assert_allclose(last.tensors["past_key_values.1.value"].numpy(),
                               pasts[-1][0].tensors["past_key_values.1.value"].numpy())
    # the 13th token no longer fits a static past: eager, on the concatenating path
    nxt = np.full((2, 1), 1, np.int64)
    m = np.concatenate([mask, np.ones((2, 13), np.int64)], axis=1)
    lg, p2 = eng.forward(nxt, m, last)
    le, _ = eager.forward(nxt, m, pasts[-1][0])
    np.testing.assert_allclose(lg, le, rtol=0, atol=1e-5)
    assert isinstance(p2, TrtKVCache) and p2.length == 16


def test_recapture_when_the_static_past_doubles_and_per_batch(plan, monkeypatch):
    path, _, contexts = plan
    monkeypatch.setattr(trt_engine, "MIN_STATIC_PAST", 4)
    ids, mask = np.array([[3, 5, 7]], np.int64), np.ones((1, 3), np.int64)
    want, _ = _decode(TrtEngine(path, cuda_graphs=False), ids, mask, 12)
    fake = FakeGraphs()
    eng = _graphed(path, fake)
    got, gpasts = _decode(eng, ids, mask, 12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # static past 4 after the prompt: decode at 3 (warm-up only); 8: at 4..7; 15 (the cap): at 8..14
    assert fake.log == (["eager"] + ["eager", "capture"] + ["replay"] * 3 + ["eager", "capture"] + ["replay"] * 6)
    assert [n for _, n in gpasts] == [4, 4] + [8] * 4 + [15] * 7
    del gpasts
    # the slots outgrown stay in the pool with their graphs: the next generation starts on the 4-long one again
    # (warm already: captured now), moves to the 8-long one (replayed); the one after only replays
    for expected in (["capture"] + ["replay"] * 5, ["replay"] * 5):
        fake.log.clear()
        got2, p2 = _decode(eng, ids, mask, 5)
        for a, b in zip(got2, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        assert fake.log == expected and [n for _, n in p2] == [4, 4] + [8] * 4
        del p2
    # another batch size is another shape: its own slot, warmed up and captured
    fake.log.clear()
    _decode(eng, np.array([[3, 5, 7], [1, 2, 4]], np.int64), np.ones((2, 3), np.int64), 3)
    assert fake.log == ["eager", "eager", "capture", "replay"]


def test_capture_failure_falls_back_once(plan, caplog):
    path, _, _ = plan
    ids, mask = np.array([[3, 5, 7]], np.int64), np.ones((1, 3), np.int64)
    want, _ = _decode(TrtEngine(path, cuda_graphs=False), ids, mask, 6)
    fake = FakeGraphs(fail=True)
    eng = _graphed(path, fake)
    with caplog.at_level(logging.WARNING, "rocket_deploy.runtime.cuda_graphs"):
        got, _ = _decode(eng, ids, mask, 6)
        got2, _ = _decode(eng, ids, mask, 6)
    for a, b, c in zip(got, got2, want):
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b, c, rtol=0, atol=1e-5)
    assert fake.log == ["eager", "capture"]
    assert len([r for r in caplog.records if "CUDA graph capture" in r.message]) == 1
    assert "not permitted" in eng.graph_stats["cuda_graphs"]


def test_plans_that_cannot_take_a_static_past(plan, monkeypatch, decoder_onnx):
    path, engines, _ = plan
    eng = TrtEngine(path)               # the default on a non-CUDA device (the fake) is off
    assert not eng.cuda_graphs
    (path.parent / "config.json").write_text(json.dumps({"sliding_window": 4096, "use_sliding_window": True}))
    eng = TrtEngine(path, cuda_graphs=True)
    assert not eng.cuda_graphs and "sliding-window" in eng.graph_stats["cuda_graphs"]
    (path.parent / "config.json").write_text(json.dumps({"sliding_window": 4096, "use_sliding_window": False}))
    assert TrtEngine(path, cuda_graphs=True).cuda_graphs
    (path.parent / "config.json").unlink()
    profile = ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16).profile(decoder_onnx)
    install_runtime(monkeypatch, lambda: _decoder_engine(profile, drop=(POSITION_IDS,)))
    eng = TrtEngine(path, cuda_graphs=True)
    assert not eng.cuda_graphs and "position_ids" in eng.graph_stats["cuda_graphs"]


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_graph_decode_equals_eager(tmp_path):
    from rocket_deploy.runtime.trt import TensorRTUnavailable, build_engine, import_tensorrt
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(str(e))
    onnx_path = tiny_decoder(tmp_path / "model.onnx")
    plan_path = tmp_path / "model.plan"
    build_engine(onnx_path, plan_path, ShapeRanges.parse(batch="1:1:2", seq="1:4:8", max_context=16),
                 builder_optimization_level=0, progress=False)
    ids, mask = np.array([[3, 5, 7], [1, 2, 4]], np.int64), np.array([[1, 1, 1], [0, 1, 1]], np.int64)
    want, _ = _decode(TrtEngine(plan_path, cuda_graphs=False), ids, mask, 12)
    eng = TrtEngine(plan_path)
    assert eng.cuda_graphs
    for _ in range(2):
        got, _ = _decode(eng, ids, mask, 12)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    st = eng.graph_stats
    assert st["cuda_graphs"] is None and st["captures"] == 1 and st["replays"] == 2 * 12 - 1, st



def test_a_static_past_the_plan_rejects_falls_back_once(plan, monkeypatch, caplog):
    path, _, _ = plan
    ids, mask = np.array([[3, 5, 7]], np.int64), np.ones((1, 3), np.int64)
    want, _ = _decode(TrtEngine(path, cuda_graphs=False), ids, mask, 4)

    def refuse(self, engine, batch, length):
        raise ValueError("TensorRT rejected shape (1, 16) for attention_mask")
    monkeypatch.setattr(trt_engine.TrtStaticKV, "__init__", refuse)
    eng = _graphed(path, FakeGraphs())
    with caplog.at_level(logging.WARNING, "rocket_deploy.runtime.trt.engine"):
        got, pasts = _decode(eng, ids, mask, 4)
        _decode(eng, ids, mask, 2)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert all(isinstance(p, TrtKVCache) for p, _ in pasts)
    assert len([r for r in caplog.records if "static past failed" in r.message]) == 1
    assert "rejected shape" in eng.graph_stats["cuda_graphs"]
