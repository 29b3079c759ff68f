"""The torch engine's static KV cache and CUDA-graph decode (runtime/static_kv.py, runtime/cuda_graphs.py).

On the CPU: the static cache gives the same greedy tokens and logits (atol 1e-5) as the dynamic cache for a dense and
a ROCKET-compressed tiny Llama (and the other tiny architectures), through growth of the cache, batch 2, interleaved
generations and slot reuse; the decode step has no host synchronisation in it (what a capture would refuse); and the
capture policy (warm up, capture once per shape, replay, fall back once, switch off) is checked with a fake graph
backend that, like a real capture, executes nothing when capturing and the recorded step on each replay. The real
capture is GPU-only.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from _rocket_fixtures import rocketize
from fake_cuda_graphs import FakeGraphs

from rocket_deploy.runtime import static_kv
from rocket_deploy.runtime.cuda_graphs import SlotPool, StepGraphs
from rocket_deploy.runtime.engine import SamplingParams
from rocket_deploy.runtime.torch_backend import StaticKVState, TorchEngine
from rocket_deploy.testing import tiny_llama

PROMPT = [5, 17, 33, 41, 9, 77, 101, 250]


@pytest.fixture(scope="module")
def dense():
    return tiny_llama(layers=2, seed=0)


@pytest.fixture(scope="module")
def rocket():
    m = tiny_llama(layers=2, seed=1)
    rocketize(m)
    return m


def _steps(engine, prompt, n, batch_rows=None):
    """Greedy decode through ``forward``: (tokens [batch, n], logits of every call, final past)."""
    ids = np.asarray(batch_rows if batch_rows is not None else [prompt], dtype=np.int64)
    mask = np.ones_like(ids) if batch_rows is None else (ids != 0).astype(np.int64)
    logits, past = engine.forward(ids, mask, None)
    all_logits, toks = [logits], []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        toks.append(nxt[:, 0])
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        logits, past = engine.forward(nxt, mask, past)
        all_logits.append(logits)
    return np.stack(toks, 1), all_logits, past


@pytest.mark.parametrize("which", ["dense", "rocket"])
def test_static_cache_matches_dynamic_cache(which, request, monkeypatch):
    monkeypatch.setattr(static_kv, "MIN_LENGTH", 8)   # 8 -> 16 -> 32: the cache grows twice in this generation
    model = request.getfixturevalue(which)
    dyn = TorchEngine(copy.deepcopy(model), device="cpu")
    sta = TorchEngine(copy.deepcopy(model), device="cpu", static_kv=True)
    assert not dyn.static_kv and sta.static_kv and not sta.cuda_graphs   # graphs are CUDA-only
    t_dyn, l_dyn, p_dyn = _steps(dyn, PROMPT, 20)
    t_sta, l_sta, p_sta = _steps(sta, PROMPT, 20)
    assert isinstance(p_sta, StaticKVState) and not isinstance(p_dyn, StaticKVState)
    assert p_sta.length == len(PROMPT) + 20 and p_sta.slot.length == 32
    np.testing.assert_array_equal(t_sta, t_dyn)
    for a, b in zip(l_sta, l_dyn):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert sta.graph_stats["eager_steps"] == 20 and sta.graph_stats["captures"] == 0


def test_static_cache_batch_of_two_padded_prompts_and_continuation(dense):
    dyn = TorchEngine(copy.deepcopy(dense), device="cpu")
    sta = TorchEngine(copy.deepcopy(dense), device="cpu", static_kv=True)
    rows = [[2, 9, 4, 7, 8, 9], [4, 5, 6, 7, 8, 9]]
    t_dyn, l_dyn, _ = _steps(dyn, None, 6, rows)
    t_sta, l_sta, p_sta = _steps(sta, None, 6, rows)
    assert isinstance(p_sta, StaticKVState) and p_sta.slot.batch == 2
    np.testing.assert_array_equal(t_sta, t_dyn)
    for a, b in zip(l_sta, l_dyn):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # padding in the prompt: the dynamic cache (models place padded positions differently)
    padded = [[0, 0, 0, 7, 8, 9], [4, 5, 6, 7, 8, 9]]                # 0 = padding, left side
    t_dyn, l_dyn, _ = _steps(dyn, None, 3, padded)
    t_sta, l_sta, p_sta = _steps(sta, None, 3, padded)
    assert not isinstance(p_sta, StaticKVState)
    np.testing.assert_array_equal(t_sta, t_dyn)
    # a multi-token continuation on top of a static past
    ids = np.array([[11, 12, 13]], np.int64)
    la, pa = dyn.forward(ids, np.ones((1, 3), np.int64), None)
    lb, pb = sta.forward(ids, np.ones((1, 3), np.int64), None)
    more = np.array([[14, 15]], np.int64)
    la2, _ = dyn.forward(more, np.ones((1, 5), np.int64), pa)
    lb2, pb = sta.forward(more, np.ones((1, 5), np.int64), pb)
    np.testing.assert_allclose(lb2, la2, rtol=0, atol=1e-5)
    assert pb.length == 5
    with pytest.raises(ValueError, match="past holds 5 tokens"):
        sta.forward(more, np.ones((1, 9), np.int64), pb)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma", "phi3"])
def test_static_cache_matches_dynamic_cache_other_architectures(arch):
    model = tiny_llama(arch=arch, layers=2)
    dyn = TorchEngine(copy.deepcopy(model), device="cpu")
    sta = TorchEngine(copy.deepcopy(model), device="cpu", static_kv=True)
    t_dyn, l_dyn, _ = _steps(dyn, PROMPT, 6)
    t_sta, l_sta, past = _steps(sta, PROMPT, 6)
    assert isinstance(past, StaticKVState)
    np.testing.assert_array_equal(t_sta, t_dyn)
    for a, b in zip(l_sta, l_dyn):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_slots_are_reused_and_interleaved_generations_keep_their_own_cache(dense):
    sta = TorchEngine(copy.deepcopy(dense), device="cpu", static_kv=True, max_static_slots=2)
    dyn = TorchEngine(copy.deepcopy(dense), device="cpu")
    params = SamplingParams(max_new_tokens=6)
    want_a = list(dyn.stream_tokens(PROMPT, params))
    want_b = list(dyn.stream_tokens(PROMPT[:3], params))
    assert list(sta.stream_tokens(PROMPT, params)) == want_a
    assert list(sta.stream_tokens(PROMPT[:3], params)) == want_b
    assert len(sta._slots) == 1                     # the finished generation's slot was reused
    ga, gb = sta.stream_tokens(PROMPT, params), sta.stream_tokens(PROMPT[:3], params)
    got_a, got_b = [], []
    for _ in range(6):                              # token by token, alternating (as the server does)
        got_a.append(next(ga))
        got_b.append(next(gb))
    assert (got_a, got_b) == (want_a, want_b) and len(sta._slots) == 2
    # a third generation while both slots are busy falls back to the dynamic cache
    ga2, gb2 = sta.stream_tokens(PROMPT, params), sta.stream_tokens(PROMPT, params)
    next(ga2), next(gb2)
    _, past = sta.forward(np.array([PROMPT], np.int64), np.ones((1, len(PROMPT)), np.int64), None)
    assert not isinstance(past, StaticKVState)
    del ga2, gb2


def test_unsupported_model_keeps_the_dynamic_cache(caplog):
    model = tiny_llama(arch="mistral", layers=2)
    model.config.sliding_window = 4                  # sliding layers: not a plain StaticLayer cache
    dyn = TorchEngine(copy.deepcopy(model), device="cpu")
    sta = TorchEngine(copy.deepcopy(model), device="cpu", static_kv=True)
    with caplog.at_level(logging.WARNING, "rocket_deploy.runtime.torch_backend"):
        t_sta, _, past = _steps(sta, PROMPT, 4)
        _steps(sta, PROMPT, 2)
    t_dyn, _, _ = _steps(dyn, PROMPT, 4)
    np.testing.assert_array_equal(t_sta, t_dyn)
    if isinstance(past, StaticKVState):              # this transformers builds full-attention layers for it
        pytest.skip("StaticCache has no sliding layers for this config here")
    assert sta.graph_stats["static_kv"] and len([r for r in caplog.records if "static KV" in r.message]) == 1


_SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "nonzero", "item", "equal")


def test_decode_step_has_no_host_synchronisation(rocket):
    """A CUDA graph capture fails on any op that reads a device value on the host; record the op stream of one
    decode step (the function that is captured) and look for them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    sta = TorchEngine(copy.deepcopy(rocket), device="cpu", static_kv=True)
    _, past = sta.forward(np.array([PROMPT], np.int64), np.ones((1, 8), np.int64), None)
    slot = past.slot
    with torch.inference_mode():
        slot.load_decode_inputs(np.array([[3]], np.int64), np.ones((1, 9), np.int64))
    with torch.inference_mode(), Ops() as ops:
        slot.decode_step()
    assert len(ops.names) > 50 and not any(n.split(".")[0] in _SYNC_OPS for n in ops.names), \
        sorted({n for n in ops.names if n.split(".")[0] in _SYNC_OPS})
    # and the same step twice from the static buffers writes the cache slot again, not the next one
    before = slot.logits.clone()
    with torch.inference_mode():
        slot.decode_step()
    np.testing.assert_allclose(slot.logits.numpy(), before.numpy(), atol=1e-6)


def _graphed(model, fake, enabled=True):
    eng = TorchEngine(copy.deepcopy(model), device="cpu", static_kv=True)
    eng._graphs = StepGraphs(fake, enabled)
    return eng


def test_capture_once_replay_per_token_recapture_on_growth(dense, monkeypatch):
    monkeypatch.setattr(static_kv, "MIN_LENGTH", 16)
    want, want_logits, _ = _steps(TorchEngine(copy.deepcopy(dense), device="cpu"), PROMPT, 12)
    fake = FakeGraphs()
    eng = _graphed(dense, fake)
    got, got_logits, past = _steps(eng, PROMPT, 12)
    np.testing.assert_array_equal(got, want)
    for a, b in zip(got_logits, want_logits):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # 8 prompt tokens in 16 slots: decode at 8..15 (warm-up, capture + replay, 6 replays), growth to 32 at 16,
    # then 16..19 (warm-up, capture + replay, 2 replays)
    assert fake.log == ["eager", "capture"] + ["replay"] * 7 + ["eager", "capture"] + ["replay"] * 3
    assert eng.graph_stats == {"captures": 2, "replays": 10, "eager_steps": 2, "capture_failures": 0,
                               "cuda_graphs": None, "static_kv": None}
    assert past.slot.length == 32
    # the next generation reuses the grown slot (free once its state is gone) and its graph: no new capture
    del past
    fake.log.clear()
    got2, _, _ = _steps(eng, PROMPT, 12)
    np.testing.assert_array_equal(got2, want)
    assert "capture" not in fake.log and fake.log.count("replay") == 12


def test_capture_failure_falls_back_once_and_switch_off(dense, caplog):
    want, _, _ = _steps(TorchEngine(copy.deepcopy(dense), device="cpu"), PROMPT, 6)
    fake = FakeGraphs(fail=True)
    eng = _graphed(dense, fake)
    with caplog.at_level(logging.WARNING, "rocket_deploy.runtime.cuda_graphs"):
        got, _, _ = _steps(eng, PROMPT, 6)
        got2, _, _ = _steps(eng, PROMPT, 6)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got2, want)
    assert fake.log == ["eager", "capture"]           # never tried again
    assert len([r for r in caplog.records if "CUDA graph capture" in r.message]) == 1
    st = eng.graph_stats
    assert st["capture_failures"] == 1 and "not permitted" in st["cuda_graphs"] and st["eager_steps"] == 11
    off = FakeGraphs()
    eng = _graphed(dense, off, enabled=False)
    np.testing.assert_array_equal(_steps(eng, PROMPT, 6)[0], want)
    assert off.log == [] and eng.graph_stats["cuda_graphs"] == "off"


def test_engine_options_defaults_on_cpu(dense):
    eng = TorchEngine(copy.deepcopy(dense), device="cpu", cuda_graphs=True)
    assert not eng.cuda_graphs and not eng.static_kv       # graphs are irrelevant on the CPU
    _, past = eng.forward(np.array([[1, 2]], np.int64), np.ones((1, 2), np.int64), None)
    assert not isinstance(past, StaticKVState)


def test_slot_pool():
    class Owner:
        pass
    pool = SlotPool(2)
    a, b = Owner(), Owner()
    s1 = pool.acquire(1, a, lambda: "s1")
    s2 = pool.acquire(1, b, lambda: "s22")
    assert (s1, s2) == ("s1", "s22") and pool.acquire(1, Owner(), lambda: "s3") is None
    del a
    c = Owner()
    assert pool.acquire(1, c, lambda: "s3") == "s1"      # a's slot is free again
    del b, c
    assert pool.acquire(1, Owner(), lambda: "new", fits=lambda s: len(s) > 2) == "s22"   # only s22 fits
    assert pool.acquire(1, Owner(), lambda: "new", fits=lambda s: len(s) > 1, size=len) == "s1"  # the smallest
    assert pool.acquire(2, Owner(), lambda: "s4") == "s4" and len(pool) == 2   # another key takes a free place


# ---- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("which", ["dense", "rocket"])
def test_cuda_graph_replay_equals_eager(which, request):
    model = request.getfixturevalue(which)   # rocket: the sparse-V CUDA kernel runs in the graph if it builds
    eager = TorchEngine(copy.deepcopy(model), device="cuda", cuda_graphs=False)
    graphed = TorchEngine(copy.deepcopy(model), device="cuda")
    assert graphed.cuda_graphs and graphed.static_kv and not eager.static_kv
    t_e, l_e, _ = _steps(eager, PROMPT, 40)
    t_g, l_g, past = _steps(graphed, PROMPT, 40)
    assert isinstance(past, StaticKVState) and past.slot.length == 256
    del past                                                  # its slot (and graph) is free for the next ones
    np.testing.assert_array_equal(t_g, t_e)
    for a, b in zip(l_g, l_e):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for _ in range(2):                                        # later generations replay the same graph
        np.testing.assert_array_equal(_steps(graphed, PROMPT, 40)[0], t_e)
    st = graphed.graph_stats
    assert st["cuda_graphs"] is None and st["static_kv"] is None and st["capture_failures"] == 0, st
    # generation 1: a warm-up step, a capture + replay, 38 replays; generations 2 and 3: 40 replays each
    assert st["captures"] == 1 and st["replays"] == 3 * 40 - 1 and st["eager_steps"] == 1, st


# ---- the switch through the CLI -------------------------------------------------------------------------------------
def test_cli_switch_reaches_the_engine(tmp_path, monkeypatch, tiny_tok):
    import json

    from _rocket_fixtures import make_artifact
    from click.testing import CliRunner

    from rocket_deploy.cli import main
    from rocket_deploy.runtime import backends
    art = make_artifact(tiny_llama(layers=1), tiny_tok, str(tmp_path / "art"))
    seen = []
    real = TorchEngine.from_path.__func__

    def from_path(cls, path, **kw):
        seen.append(kw.get("cuda_graphs", "absent"))
        return real(cls, path, **kw)
    monkeypatch.setattr(TorchEngine, "from_path", classmethod(from_path))
    for flag, want in (("--no-cuda-graphs", False), ("--cuda-graphs", True), (None, "absent")):
        args = ["bench", art, "--prompt-len", "4", "--gen-len", "3", "--runs", "1", "--warmup", "0", "--json"]
        r = CliRunner().invoke(main, args + ([flag] if flag else []), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        out = json.loads(r.output.strip().splitlines()[-1])
        assert out["cuda_graphs"]["cuda_graphs"] == "off"            # CPU: no graphs whatever the flag says
        assert seen[-1] == want
    assert "cuda_graphs" in backends.BACKENDS["torch"].kwargs and "cuda_graphs" in backends.BACKENDS["trt"].kwargs

    import rocket_deploy.runtime.engine as engine_mod

    class Opened(Exception):
        pass

    def fake_open(path, **kw):
        raise Opened(kw)
    monkeypatch.setattr(engine_mod, "open_engine", fake_open)
    r = CliRunner().invoke(main, ["serve", art, "--no-cuda-graphs"])
    assert r.exit_code != 0 and "'cuda_graphs': False" in r.output, r.output


def test_gpu_check_end_to_end_runs_all_three_ways_on_cpu(monkeypatch, tmp_path, tiny_tok):
    """bench/gpu_check.py's end-to-end step as a CPU dry run on a tiny model: the three variants, their graph
    counters, the greedy-equality record and the markdown table (on a GPU the same code measures SmolLM2)."""
    import importlib.util
    import types
    from pathlib import Path

    import rocket_deploy.models as models
    spec = importlib.util.spec_from_file_location("gpu_check_dry", Path(__file__).parents[2] / "bench" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    monkeypatch.setattr(models, "load_model",
                        lambda name, dtype=None: types.SimpleNamespace(model=tiny_llama(layers=1), tokenizer=tiny_tok))
    r = gc.end_to_end(None, 8, 4, 1, device="cpu", dtype_name="fp32", budgets=(0.3,))
    dense = r["models"]["dense"]
    assert {"eager", "static-kv", "cuda-graphs"} <= set(dense) and "graphs_speedup_vs_eager" in dense
    assert dense["static-kv"]["graph_stats"]["static_kv"] is None and dense["static-kv"]["graph_stats"]["eager_steps"]
    assert dense["cuda-graphs"]["graph_stats"]["cuda_graphs"] == "off"          # no CUDA here
    assert r["greedy_32_equal_to_eager"] == {"dense": True, "rocket-0.3": True}
    gc.write_markdown(tmp_path, {"steps": {}, "extension": {"device": "cpu"}, "end_to_end": r})
    md = (tmp_path / "gpu_check.md").read_text()
    assert "graphs x eager" in md and "static-kv tok/s" in md
