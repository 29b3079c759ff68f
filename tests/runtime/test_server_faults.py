"""The server under faults (issue 12), each over loopback with a real uvicorn, signals with a real subprocess:
client disconnects, slow / partial requests, prompts past the model's context, hostile JSON, a shutdown that
outlives its timeout, the API key, request ids, and options the server refuses."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _server_fixtures import (CHAT, MODEL, ServerProcess, SlowEngine, assert_error, metric, running,  # noqa: E402
                              sse, tiny_engine, wait_for)

from rocket_deploy.runtime.engine import Engine  # noqa: E402
from rocket_deploy.runtime.server import exposure_warning, make_server  # noqa: E402
from rocket_deploy.runtime.server.settings import ServerSettings  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def srv(engine):
    with running(engine) as r:
        yield r


def _in_flight(r) -> int:
    with r.client() as c:
        return c.get("/health").json()["in_flight"]


# ------------------------------------------------------------------------------------------------ disconnects
def test_non_stream_disconnect_cancels_generation(engine):
    """A non-streaming client that goes away mid-generation: generation stops at the next token, the slot is
    free at once, the disconnect is counted (and the request recorded as 499)."""
    slow = SlowEngine(engine, delay=0.03)
    with running(slow, max_new_tokens=200) as r:
        with pytest.raises(httpx.ReadTimeout), r.client(timeout=0.6) as c:
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 200, "temperature": 0})
        assert wait_for(lambda: _in_flight(r) == 0, timeout=2)
        calls = slow.calls
        time.sleep(0.3)
        assert slow.calls == calls < 60, (calls, slow.calls)        # 200 tokens would take ~6 s
        with r.client() as c:
            m = c.get("/metrics").text
            assert metric(m, "rocket_client_disconnects_total") == 1
            assert metric(m, "rocket_requests_total", 'endpoint="/v1/completions",status="499"') == 1
            ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_disconnect_while_queued_frees_the_queue_place(engine):
    slow = SlowEngine(engine, delay=0.03)
    with running(slow, max_new_tokens=200, max_concurrent=1, max_queue=1) as r:
        out = {}

        def hog():
            with r.client() as c:
                out["a"] = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 40, "temperature": 0})
        t = threading.Thread(target=hog)
        t.start()
        assert wait_for(lambda: _in_flight(r) == 1)
        with pytest.raises(httpx.ReadTimeout), r.client(timeout=0.4) as c:
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5})
        with r.client() as c:
            assert wait_for(lambda: c.get("/health").json()["waiting"] == 0, timeout=2)
            # the queue place is free again: a second waiter is accepted (not 429) and served after A
            b = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "temperature": 0})
            assert b.status_code == 200, b.text
        t.join(timeout=20)
        assert out["a"].status_code == 200


# ------------------------------------------------------------------------------------------------ slow clients
def _raw(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data`` and read until the server closes the connection; (what came back, seconds it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        t0 = time.monotonic()
        if data:
            s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - t0


def test_header_and_body_read_timeouts(engine):
    with running(engine, header_timeout_s=0.5, body_timeout_s=0.5) as r:
        # nothing at all, then partial headers: 408 and the connection is closed, after ~0.5 s
        for data in (b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"):
            got, took = _raw(r.port, data)
            assert got.startswith(b"HTTP/1.1 408 "), got
            assert 0.4 < took < 3, took
            body = json.loads(got.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["code"] == "request_timeout" and "--header-timeout" in body["error"]["message"]
        # complete headers, a body that never completes: 408 JSON from the app, connection closed
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        got, took = _raw(r.port, head)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert 0.4 < took < 3, took
        assert b"--body-timeout" in got and b"x-request-id" in got.lower()
        # a keep-alive connection whose next request stalls mid-headers is cut the same way
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b'"waiting":' not in first:                  # the whole first response (headers + body)
                first += s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
            t0 = time.monotonic()
            got = s.recv(65536)
            assert got.startswith(b"HTTP/1.1 408 ") and time.monotonic() - t0 < 3, got
        with r.client() as c:                   # the server is fine, and normal requests are not affected
            ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200 and c.get("/health").json()["in_flight"] == 0


# ------------------------------------------------------------------------------------------------ context
def test_prompt_past_the_model_context_is_refused_before_generating(engine):
    assert engine.max_context == 256                       # tiny_llama: max_position_embeddings
    slow = SlowEngine(engine)
    with running(slow, max_prompt_tokens=4096, max_new_tokens=64) as r, r.client() as c:
        long_prompt = list(range(5, 5 + 300))              # token ids: exact length
        err = assert_error(c.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}), 400,
                           "prompt", "context_length_exceeded")
        assert "256" in err["message"] and "300" in err["message"]
        err = assert_error(c.post("/v1/completions", json={"prompt": long_prompt[:250], "max_tokens": 10}), 400,
                           "max_tokens", "context_length_exceeded")
        assert "at most 6" in err["message"]
        with c.stream("POST", "/v1/completions", json={"prompt": long_prompt, "stream": True}) as s:
            assert s.status_code == 400                    # refused before the stream starts
        assert slow.calls == 0                             # nothing reached the model
        ok = c.post("/v1/completions", json={"prompt": long_prompt[:250], "temperature": 0})  # max_tokens clipped
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] <= 6


def test_backends_expose_their_max_context():
    """torch: from the config (max_position_embeddings / GPT-2's n_positions); OPT used to answer 500."""
    import transformers as tf

    from rocket_deploy.runtime.torch_backend import TorchEngine
    from rocket_deploy.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    opt = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=40,
                                         word_embed_proj_dim=32)).eval()
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=24)).eval()
    assert TorchEngine(gpt2, tok, device="cpu").max_context == 24
    e = TorchEngine(opt, tok, device="cpu")
    assert e.max_context == 40
    with running(e) as r, r.client() as c:
        assert_error(c.post("/v1/completions", json={"prompt": list(range(5, 50)), "max_tokens": 2}), 400,
                     "prompt", "context_length_exceeded")
        assert c.post("/v1/completions", json={"prompt": list(range(5, 30))}).status_code == 200


def test_ort_engine_reads_max_context_from_config(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from rocket_deploy.runtime.ort_backend import OrtEngine
    # a "decoder" without KV cache: logits [b, s, 1] = float(input_ids); enough to open the session
    g = helper.make_graph(
        [helper.make_node("Unsqueeze", ["input_ids", "axes"], ["u"]),
         helper.make_node("Cast", ["u"], ["logits"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
              str(tmp_path / "model.onnx"))
    e = OrtEngine(tmp_path / "model.onnx", load_tokenizer=False)
    assert e.is_decoder and e.max_context is None                    # no config.json: unknown
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 77}))
    assert OrtEngine(tmp_path / "model.onnx", load_tokenizer=False).max_context == 77


# ------------------------------------------------------------------------------------------------ hostile JSON
def test_deeply_nested_json_is_400(engine, caplog):
    with running(engine, max_body_bytes=1 << 20) as r, r.client() as c, caplog.at_level(logging.ERROR):
        for raw in (b"[" * 200_000, b'{"prompt": "hi", "logit_bias": ' + b'{"a": ' * 100 + b"1" + b"}" * 101,
                    b'{"messages": [{"role": "user", "content": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"):
            r_ = c.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            err = assert_error(r_, 400, code="invalid_json")
            assert "nested deeper" in err["message"]
        assert c.get("/health").json()["status"] == "ok"
    assert not [rec for rec in caplog.records if "Recursion" in rec.getMessage()]


# ------------------------------------------------------------------------------------------------ shutdown
def test_sigterm_past_shutdown_timeout(tmp_path):
    """Requests that outlive --shutdown-timeout: non-streaming -> 503 JSON, a stream -> a final error event and
    [DONE]; /health answers 503 while draining; the process exits 0."""
    sp = ServerProcess(tmp_path, delay=0.1, shutdown_timeout_s=1.5, max_new_tokens=200)
    try:
        sp.wait_ready()
        out = {}

        def plain():
            out["plain"] = httpx.post(sp.url + "/v1/completions", timeout=30,
                                      json={"prompt": "Hi", "max_tokens": 200, "temperature": 0})

        def stream():
            with httpx.stream("POST", sp.url + "/v1/chat/completions", timeout=30,
                              json={"messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}) as s:
                out["stream_status"] = s.status_code
                out["events"] = sse(s)
        ts = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in ts:
            t.start()
        assert wait_for(lambda: sp.health().json()["in_flight"] == 2, timeout=10)
        t_sig = time.monotonic()
        sp.sigterm()
        assert wait_for(lambda: sp.health().status_code == 503, timeout=1)
        h = sp.health()
        assert h.json()["status"] == "draining" and h.headers.get("retry-after") == "1"
        refused = httpx.post(sp.url + "/v1/completions", json={"prompt": "Hi"}, timeout=5)
        assert_error(refused, 503, code="shutting_down")
        for t in ts:
            t.join(timeout=20)
        took = time.monotonic() - t_sig
        assert 1.4 < took < 6, took
        err = assert_error(out["plain"], 503, code="shutting_down")
        assert "1.5s" in err["message"]
        ev = out["events"]
        assert out["stream_status"] == 200 and ev[-1] == "[DONE]", ev[-3:]
        assert ev[-2]["error"]["code"] == "shutting_down", ev[-2]
        assert any("choices" in e for e in ev[:-2])          # it was streaming before it was cut
        assert sp.proc.wait(timeout=15) == 0
    finally:
        log = sp.close()
    assert "Traceback" not in log, log


# ------------------------------------------------------------------------------------------------ API key
def test_api_key(engine):
    key = "s3cret-key_123"
    with running(engine, api_key=key) as r, r.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                        {"Authorization": f"Basic {key}"}, {"Authorization": f"Bearer {key}x"}):
            res = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
            assert_error(res, 401, code="invalid_api_key")
            assert res.headers["www-authenticate"] == "Bearer" and res.headers["x-request-id"]
        assert_error(c.get("/metrics"), 401)
        assert_error(c.get("/v1/models"), 401)
        assert c.get("/health").status_code == 200                    # probes need no key
        auth = {"Authorization": f"Bearer {key}"}
        ok = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth)
        assert ok.status_code == 200, ok.text
        assert c.get("/v1/models", headers={"authorization": f"bearer {key}"}).status_code == 200
        assert metric(c.get("/metrics", headers=auth).text, "rocket_requests_total",
                      'endpoint="/v1/completions",status="401"') == 5
    assert key not in repr(ServerSettings(api_key=key))


def test_exposure_warning(engine, caplog):
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None and exposure_warning("0.0.0.0", "k") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None) and exposure_warning("myhost.lan", None)
    with caplog.at_level(logging.WARNING, logger="rocket_deploy.server"):
        make_server(engine, "0.0.0.0", 0, ServerSettings(model_name=MODEL))
    assert any("without an API key" in rec.getMessage() for rec in caplog.records)


def test_cli_api_key_from_env(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import rocket_deploy.runtime.engine as engine_mod
    import rocket_deploy.runtime.server as server_mod
    from rocket_deploy.cli import main

    seen = {}

    class Stub(Engine):
        backend, is_decoder = "stub", True

        def forward(self, *a):
            raise AssertionError("not called")

    monkeypatch.setattr(engine_mod, "open_engine", lambda *a, **k: Stub())
    monkeypatch.setattr(server_mod, "serve", lambda engine, **kw: seen.update(kw))
    res = CliRunner().invoke(main, ["serve", str(tmp_path), "--header-timeout", "3"],
                             env={"ROCKET_API_KEY": "from-env"})
    assert res.exit_code == 0, res.output
    assert seen["settings"].api_key == "from-env" and seen["settings"].header_timeout_s == 3
    res = CliRunner().invoke(main, ["serve", str(tmp_path), "--api-key", "has space"])
    assert res.exit_code == 2 and "--api-key" in res.output and "has space" not in res.output
    res = CliRunner().invoke(main, ["serve", str(tmp_path), "--body-timeout", "0"])
    assert res.exit_code == 2 and "--body-timeout" in res.output


# ------------------------------------------------------------------------------------------------ request ids
class BrokenEngine(Engine):
    backend = "broken"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask, past):
        raise RuntimeError("the accelerator caught fire")


def test_request_id_on_every_response(engine, srv):
    rid = {"x-request-id": "client-id-42"}
    with srv.client() as c:
        answers = [c.get("/health", headers=rid), c.get("/metrics", headers=rid), c.get("/nope", headers=rid),
                   c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=rid),
                   c.post("/v1/completions", json={"prompt": 5}, headers=rid),
                   c.post("/v1/completions", content=b"x" * 10000, headers={**rid, "content-type": "application/json"})]
        with c.stream("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True},
                      headers=rid) as s:
            s.read()
            answers.append(s)
        assert [a.status_code for a in answers] == [200, 200, 404, 200, 400, 413, 200]
        assert all(a.headers["x-request-id"] == "client-id-42" for a in answers)
        made = {c.get("/health").headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(len(m) == 32 for m in made)        # one per response when not given
    with running(BrokenEngine(engine.tokenizer)) as r, r.client() as c:
        res = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=rid)
        assert_error(res, 500, code="internal_error")
        assert res.headers["x-request-id"] == "client-id-42"


# ------------------------------------------------------------------------------------------------ refused options
@pytest.mark.parametrize("path,extra,param,code", [
    ("/v1/completions", {"suffix": "tail"}, "suffix", "unsupported"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format", "unsupported"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format", "unsupported"),
    ("/v1/completions", {"frobnicate": True}, "frobnicate", "unknown_field"),
    ("/v1/chat/completions", {"max_completion_tokens": 2, "reasoning_effort": "high"}, "reasoning_effort",
     "unknown_field"),
    ("/v1/completions", {"max_completion_tokens": 2}, "max_completion_tokens", "unknown_field"),   # chat only
    ("/v1/completions", {"logprobs": 2}, "logprobs", "unsupported"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools", "unsupported"),
    ("/v1/completions", {"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x", "unknown_field"),
])
def test_unsupported_and_unknown_fields_are_refused(srv, path, extra, param, code):
    base = {"messages": CHAT} if "chat" in path else {"prompt": "Hi"}
    with srv.client() as c:
        err = assert_error(c.post(path, json={**base, "max_tokens": 2, **extra}), 400, param, code)
        assert param in err["message"]


def test_default_valued_options_are_accepted(srv):
    """The values that mean 'off' pass (what OpenAI clients send by default); they change nothing."""
    with srv.client() as c:
        ref = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0}).json()
        res = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0, "n": 1,
                                              "suffix": None, "echo": False, "logprobs": None,
                                              "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                                              "response_format": {"type": "text"}, "user": "u1"})
        assert res.status_code == 200, res.text
        assert res.json()["choices"][0]["text"] == ref["choices"][0]["text"]
        assert np.isfinite(res.json()["created"])
