"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 (ephemeral port) over a tiny random Llama,
spoken to with httpx. Every wait is bounded. Concurrency and shutdown: test_server_concurrency.py; faults
(disconnects, timeouts, context, signals, API key, request ids): test_server_faults.py; detokenisation:
test_server_detok.py."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _server_fixtures import (CHAT, LIMITS, MODEL, EncoderEngine, assert_error, metric, running,  # noqa: E402
                              sse, tiny_engine)

from rocket_deploy.runtime.engine import SamplingParams, sample_next  # noqa: E402
from rocket_deploy.runtime.server import ServerSettings, TextGeneration  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def srv(engine):
    with running(engine) as r:
        yield r


@pytest.fixture()
def client(srv):
    with srv.client() as c:
        yield c


# ------------------------------------------------------------------------------------------------ basics
def test_models_and_health(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL and h["is_decoder"] is True and h["in_flight"] == 0


def test_completion_matches_engine_greedy(client, engine):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "The list type", "max_tokens": 12,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "text_completion" and b["model"] == MODEL and b["id"].startswith("cmpl-")
    assert isinstance(b["created"], int)
    (choice,) = b["choices"]
    ref = engine.generate("The list type", params=SamplingParams(max_new_tokens=12))
    assert choice["text"] == ref.text and choice["index"] == 0
    assert choice["finish_reason"] == ref.finish_reason == "length"
    assert b["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 12,
                          "total_tokens": ref.prompt_tokens + 12}


def test_completion_with_token_ids(client, engine):
    ids = engine.encode_prompt("The list type")
    a = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    b = client.post("/v1/completions", json={"prompt": "The list type", "max_tokens": 6, "temperature": 0}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == len(ids)
    r = client.post("/v1/completions", json={"prompt": [1, 2, 99999], "max_tokens": 2})
    assert_error(r, 400, "prompt")


def test_chat_and_streaming_equal_greedy(client, engine):
    req = {"model": MODEL, "messages": CHAT, "max_tokens": 20, "temperature": 0}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "chat.completion" and b["id"].startswith("chatcmpl-")
    msg = b["choices"][0]["message"]
    assert msg["role"] == "assistant"
    ref = engine.generate(messages=CHAT, params=SamplingParams(max_new_tokens=20))
    assert msg["content"] == ref.text
    assert b["choices"][0]["finish_reason"] == ref.finish_reason
    assert b["usage"]["prompt_tokens"] == ref.prompt_tokens
    assert b["usage"]["completion_tokens"] == len(ref.token_ids)

    with client.stream("POST", "/v1/chat/completions",
                       json={**req, "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200
        events = sse(s)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert usage["choices"] == [] and usage["usage"] == b["usage"]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == MODEL and len(c["choices"]) == 1
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert chunks[-1]["choices"][0]["delta"] == {}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == msg["content"]


def test_completion_streaming(client):
    req = {"prompt": "Return a list", "max_tokens": 10, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as s:
        events = sse(s)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_is_deterministic(client):
    def run(seed):
        r = client.post("/v1/completions", json={"prompt": "Sort the", "max_tokens": 16, "temperature": 1.0,
                                                 "top_p": 0.95, "top_k": 100, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    assert run(7) == run(7)
    assert len({run(s) for s in (1, 2, 3, 4)}) > 1


def test_stop_strings(client, engine):
    full = engine.generate(messages=CHAT, params=SamplingParams(max_new_tokens=20)).text
    assert len(full) >= 6, full
    stop = full[3:5]
    expected = full[:full.index(stop)]
    req = {"messages": CHAT, "max_tokens": 20, "temperature": 0, "stop": [stop, "never-appears"]}
    b = client.post("/v1/chat/completions", json=req).json()
    assert b["choices"][0]["message"]["content"] == expected
    assert b["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
        events = sse(s)
    chunks = events[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_generation_holds_back_partial_stop(engine):
    """Unit check of the detokenizer: text that may begin a stop string is held back until it is decided."""
    ids = engine.encode_prompt(messages=CHAT)
    full = engine.generate(prompt_ids=ids, params=SamplingParams(max_new_tokens=20)).text
    stop = full[4:7] + "\x00"                       # its first 3 characters appear, the stop string never does
    g = TextGeneration(engine, ids, SamplingParams(max_new_tokens=20), (stop,))
    released, steps, held_some = [], 0, False
    while not g.done and steps < 50:
        released.append(g.step())
        steps += 1
        if g.done:
            break
        so_far = engine.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        pending = len(so_far) - len(g.text)
        need = max((k for k in range(1, len(stop)) if so_far.endswith(stop[:k])), default=0)
        assert so_far.startswith(g.text) and pending >= need, (so_far, g.text, need)
        held_some |= need > 0
    assert held_some
    assert g.done and g.finish_reason == "length" and "".join(released) == full == g.text


def test_metrics_move(client):
    before = client.get("/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    b = before.text
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    a = client.get("/metrics").text
    lab = 'endpoint="/v1/completions",status="200"'
    assert metric(a, "rocket_requests_total", lab) == metric(b, "rocket_requests_total", lab) + 1
    lab400 = 'endpoint="/v1/completions",status="400"'
    assert metric(a, "rocket_requests_total", lab400) == metric(b, "rocket_requests_total", lab400) + 1
    assert metric(a, "rocket_generation_tokens_total") == metric(b, "rocket_generation_tokens_total") + 5
    assert metric(a, "rocket_prompt_tokens_total") == (metric(b, "rocket_prompt_tokens_total")
                                                       + r.json()["usage"]["prompt_tokens"])
    assert metric(a, "rocket_requests_in_flight") == 0
    assert "# TYPE rocket_request_latency_seconds histogram" in a
    assert metric(a, "rocket_request_latency_seconds_count", 'endpoint="/v1/completions"') >= 2
    assert 'rocket_queue_rejections_total{reason="queue_full"}' in a
    assert metric(a, "rocket_time_to_first_token_seconds_count") >= 1


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),                                 # missing field
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),                                    # empty prompt
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),                                    # wrong types
    ("/v1/completions", {"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),             # ranges
    ("/v1/completions", {"prompt": "hi", "max_tokens": 33}, 400, "max_tokens"),            # over the limit (32)
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n"),                               # unsupported
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),                 # unknown model
    ("/v1/completions", [1, 2], 400, None),                                                # not an object
])
def test_invalid_requests(client, path, body, status, param):
    assert_error(client.post(path, json=body), status, param)


def test_malformed_json_and_content_type(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    r = client.post("/v1/completions", content=b"prompt=hi",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 415)
    r = client.post("/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_oversized_body_413(client):
    big = {"prompt": "x" * 20000, "max_tokens": 2}
    assert_error(client.post("/v1/completions", json=big), 413, code="request_too_large")

    def chunks():                                  # no Content-Length: chunked transfer encoding
        for _ in range(20):
            yield b" " * 1000
        yield b'{"prompt": "hi"}'
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert client.get("/health").json()["status"] == "ok"


def test_prompt_over_token_limit(client, engine):
    prompt = "list of words " * 40
    assert len(engine.encode_prompt(prompt)) > LIMITS["max_prompt_tokens"]
    err = assert_error(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}), 400, "prompt",
                       "context_length_exceeded")
    assert str(LIMITS["max_prompt_tokens"]) in err["message"]
    long_chat = [{"role": "user", "content": prompt}]
    assert_error(client.post("/v1/chat/completions", json={"messages": long_chat}), 400, "messages")
    with client.stream("POST", "/v1/chat/completions", json={"messages": long_chat, "stream": True}) as s:
        assert s.status_code == 400                # refused before the stream starts
    assert client.get("/health").json()["in_flight"] == 0


def test_openai_client_compat(srv):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 8
    text = "".join(ch.choices[0].delta.content or "" for ch in
                   c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True)
                   if ch.choices)
    assert text == r.choices[0].message.content
    assert [m.id for m in c.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1000)


def test_encoder_engine_answers_400(engine):
    with running(EncoderEngine(engine.tokenizer)) as r, r.client() as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": "hi"}), 400, code="model_not_generative")
        assert "encoder" in err["message"]
        assert_error(c.post("/v1/chat/completions", json={"messages": CHAT}), 400, code="model_not_generative")
        assert c.get("/health").json()["is_decoder"] is False


# ------------------------------------------------------------------------------------------------ unit + CLI
def test_settings_validation():
    for bad in (dict(max_concurrent=0), dict(max_queue=-1), dict(max_new_tokens=1.5), dict(model_name=""),
                dict(request_timeout_s=0), dict(shutdown_timeout_s=float("inf")), dict(max_body_bytes=True)):
        with pytest.raises(ValueError):
            ServerSettings(**bad)


def test_engine_sampling_guards():
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("nan"))
    rng = np.random.default_rng(0)
    tok = sample_next(np.arange(10.0), SamplingParams(temperature=1.0, top_k=50), rng)   # top_k > vocab: all kept
    assert 0 <= tok < 10


def test_torch_engine_kv_cache_current_api(engine, monkeypatch):
    """Prefill + decode through the KV cache use transformers' current names (``cache`` in 5.x, not the deprecated
    ``past_key_values``: FutureWarning on the argument, a logged warning on the output field) and the decode step
    equals a full forward of the whole sequence."""
    import logging
    import warnings

    import torch

    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)),
                        raising=False)
    ids = np.array([[5, 17, 42, 9, 100, 7]], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _, past = engine.forward(ids[:, :5], np.ones((1, 5), np.int64), None)
        step, past = engine.forward(ids[:, 5:], np.ones((1, 6), np.int64), past)
    assert not [m for m in logged if "past_key_values" in m or "deprecated" in m], logged
    assert past is not None and past.get_seq_length() == 6
    with torch.no_grad():
        full = engine.model(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_cli_missing_path(tmp_path):
    from click.testing import CliRunner

    from rocket_deploy.cli import main
    res = CliRunner().invoke(main, ["serve", str(tmp_path / "nope"), "--port", "0"])
    assert res.exit_code == 2
    assert "does not exist" in res.output and "rocket-deploy compress" in res.output
    res = CliRunner().invoke(main, ["serve", str(tmp_path), "--max-concurrent", "0"])
    assert res.exit_code == 2 and "--max-concurrent" in res.output and "max_concurrent" in res.output
