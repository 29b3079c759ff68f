"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 (ephemeral port) over a tiny random Llama,
spoken to with httpx. Every wait is bounded."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from rocket_deploy.runtime.engine import Engine, SamplingParams, sample_next  # noqa: E402
from rocket_deploy.runtime.server import ServerSettings, TextGeneration, make_server  # noqa: E402

MODEL = "tiny"
LIMITS = dict(max_prompt_tokens=48, max_new_tokens=32, max_body_bytes=8192)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about lists."}]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def engine():
    from rocket_deploy.runtime.torch_backend import TorchEngine
    from rocket_deploy.testing import tiny_llama, tiny_tokenizer
    return TorchEngine(tiny_llama(), tiny_tokenizer(), device="cpu")


class SlowEngine(Engine):
    """Wraps an engine: sleeps ``delay`` per forward (``prefill_delay`` on the first call of a sequence) and
    counts forwards, to make concurrency, disconnects and shutdown observable."""

    backend = "slow"

    def __init__(self, inner: Engine, delay: float = 0.0, prefill_delay: float | None = None):
        self.inner, self.delay = inner, delay
        self.prefill_delay = delay if prefill_delay is None else prefill_delay
        self.tokenizer = inner.tokenizer
        self.is_decoder = True
        self.calls = 0

    def forward(self, input_ids, attention_mask, past):
        self.calls += 1
        time.sleep(self.prefill_delay if past is None else self.delay)
        return self.inner.forward(input_ids, attention_mask, past)


class EncoderEngine(Engine):
    backend = "stub-encoder"
    is_decoder = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask, past):
        return np.zeros((*input_ids.shape, 8), np.float32), None


class Running:
    def __init__(self, server, url, thread):
        self.server, self.url, self.thread = server, url, thread

    def client(self, timeout: float = 20.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


@contextlib.contextmanager
def running(engine: Engine, **settings):
    s = ServerSettings(**{"model_name": MODEL, **LIMITS, **settings})
    server = make_server(engine, "127.0.0.1", 0, s, log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t_end = time.monotonic() + 20
    while not server.started:
        assert th.is_alive() and time.monotonic() < t_end, "server did not start"
        time.sleep(0.02)
    try:
        yield Running(server, f"http://127.0.0.1:{port}", th)
    finally:
        server.should_exit = True
        th.join(timeout=15)
        sock.close()
        assert not th.is_alive(), "server thread did not stop"


@pytest.fixture(scope="module")
def srv(engine):
    with running(engine) as r:
        yield r


@pytest.fixture()
def client(srv):
    with srv.client() as c:
        yield c


def sse(resp) -> list:
    """Parse an SSE body into JSON payloads; the literal [DONE] stays a string."""
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(text: str, name: str, labels: str = "") -> float:
    pat = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)$"
    m = re.search(pat, text, re.M)
    return float(m.group(1)) if m else 0.0


def assert_error(r, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


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
    r = client.post("/v1/completions", content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
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


# ------------------------------------------------------------------------------------------------ concurrency
def _fire(url: str, n: int, body: dict, path: str = "/v1/completions") -> list:
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i):
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait(timeout=10)
            results[i] = c.post(path, json=body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    assert all(not t.is_alive() for t in threads)
    return results


def test_concurrency_limit_rejects_with_retry_after(engine):
    slow = SlowEngine(engine, delay=0.03)
    with running(slow, max_concurrent=1, max_queue=1) as r:
        res = _fire(r.url, 6, {"prompt": "Hello", "max_tokens": 8, "temperature": 0})
        codes = [x.status_code for x in res]
        assert set(codes) <= {200, 429, 503}, codes
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        for x in res:
            if x.status_code == 429:
                assert x.headers["retry-after"] == "1"
                assert x.json()["error"]["type"] == "rate_limit_error"
            if x.status_code == 200:
                assert x.json()["usage"]["completion_tokens"] == 8
        with r.client() as c:
            h = c.get("/health").json()
            assert h["status"] == "ok" and h["in_flight"] == 0 and h["waiting"] == 0
            m = c.get("/metrics").text
            assert metric(m, "rocket_queue_rejections_total", 'reason="queue_full"') == codes.count(429)
            assert metric(m, "rocket_requests_total", 'endpoint="/v1/completions",status="429"') == codes.count(429)
            assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_queue_timeout_503_and_generation_timeout_504(engine):
    slow = SlowEngine(engine, delay=0.0, prefill_delay=1.0)
    with running(slow, max_concurrent=1, max_queue=4, request_timeout_s=0.4) as r:
        out = {}

        def first():
            with r.client() as c:
                out["a"] = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
        t = threading.Thread(target=first)
        t.start()
        time.sleep(0.15)                           # A is in its (1 s) prefill
        with r.client() as c:
            t0 = time.monotonic()
            b = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0})
            assert time.monotonic() - t0 < 2.0
        t.join(timeout=10)
        assert_error(b, 503, code="queue_timeout")
        assert b.headers["retry-after"] == "1"
        assert_error(out["a"], 504, code="timeout")
        with r.client() as c:
            assert c.get("/health").json()["in_flight"] == 0


def test_interleaved_streams_match_serial(engine):
    """Two concurrent requests interleave token by token on the single engine thread; each still gets exactly
    its own (seeded) output."""
    slow = SlowEngine(engine, delay=0.005)
    bodies = [{"prompt": "Sort the", "max_tokens": 12, "temperature": 0.8, "seed": s} for s in (11, 12)]
    with running(slow, max_concurrent=2, max_queue=2) as r:
        with r.client() as c:
            serial = [c.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
        res = {}

        def go(i):
            with r.client() as c:
                res[i] = c.post("/v1/completions", json=bodies[i]).json()["choices"][0]["text"]
        ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=20)
        assert [res[0], res[1]] == serial


def test_client_disconnect_stops_generation(engine):
    slow = SlowEngine(engine, delay=0.03)
    with running(slow, max_new_tokens=200) as r:
        with r.client() as c:
            with c.stream("POST", "/v1/chat/completions",
                          json={"messages": CHAT, "max_tokens": 200, "temperature": 0, "stream": True}) as s:
                assert s.status_code == 200
                got = 0
                for line in s.iter_lines():
                    got += bool(line)
                    if got >= 3:
                        break                      # leaving the block closes the connection mid-stream
        with r.client() as c:
            t_end = time.monotonic() + 5
            while c.get("/health").json()["in_flight"] and time.monotonic() < t_end:
                time.sleep(0.05)
            assert c.get("/health").json()["in_flight"] == 0
            calls = slow.calls
            time.sleep(0.3)
            assert slow.calls == calls < 100, (calls, slow.calls)
            assert metric(c.get("/metrics").text, "rocket_client_disconnects_total") == 1


# ------------------------------------------------------------------------------------------------ shutdown
def test_graceful_shutdown_finishes_in_flight(engine):
    slow = SlowEngine(engine, delay=0.05)
    with running(slow, shutdown_timeout_s=10) as r:
        out = {}

        def request():
            with r.client() as c:
                out["r"] = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 16, "temperature": 0})
        t = threading.Thread(target=request)
        t.start()
        with r.client() as c:
            t_end = time.monotonic() + 5
            while c.get("/health").json()["in_flight"] == 0 and time.monotonic() < t_end:
                time.sleep(0.02)
        r.server.handle_exit(signal.SIGTERM, None)     # what uvicorn's SIGTERM handler calls
        t.join(timeout=15)
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 16
        r.thread.join(timeout=15)
        assert not r.thread.is_alive()
        with pytest.raises(httpx.TransportError), r.client(timeout=2) as c:
            c.get("/health")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_subprocess(tmp_path):
    """A real process: SIGTERM while a request is in flight -> the request completes, the process exits 0."""
    port = _free_port()
    script = tmp_path / "srv.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import torch
        torch.set_num_threads(1)
        from rocket_deploy.runtime.engine import Engine
        from rocket_deploy.runtime.server import ServerSettings, serve
        from rocket_deploy.runtime.torch_backend import TorchEngine
        from rocket_deploy.testing import tiny_llama, tiny_tokenizer

        class Slow(TorchEngine):
            def forward(self, *a):
                time.sleep(0.05)
                return super().forward(*a)

        serve(Slow(tiny_llama(), tiny_tokenizer(), device="cpu"), "127.0.0.1", {port},
              ServerSettings(model_name="tiny", shutdown_timeout_s=10), log_level="warning")
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 40
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < t_end, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = {}

        def request():
            out["r"] = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 20,
                                                                  "temperature": 0}, timeout=20)
        t = threading.Thread(target=request)
        t.start()
        t_end = time.monotonic() + 5
        while httpx.get(url + "/health", timeout=2).json()["in_flight"] == 0 and time.monotonic() < t_end:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=20)
        body = out["r"].json()
        assert out["r"].status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 20
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


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
