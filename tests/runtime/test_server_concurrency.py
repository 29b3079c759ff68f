"""The server under concurrent load and at shutdown: admission (429 / 503 / 504), token-by-token interleaving,
client disconnects, graceful drain on SIGTERM (in a thread and in a real subprocess)."""
from __future__ import annotations

import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _server_fixtures import (CHAT, ServerProcess, SlowEngine, assert_error, metric, running,  # noqa: E402
                              tiny_engine, wait_for)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


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
    """handle_exit (what SIGTERM calls) starts a drain: the listener stays open, /health answers 503 draining,
    new generation requests 503 shutting_down, the in-flight request finishes, then the server stops."""
    slow = SlowEngine(engine, delay=0.05)
    with running(slow, shutdown_timeout_s=10) as r:
        out = {}

        def request():
            with r.client() as c:
                out["r"] = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 16, "temperature": 0})
        t = threading.Thread(target=request)
        t.start()
        with r.client() as c:
            assert wait_for(lambda: c.get("/health").json()["in_flight"] == 1)
        r.server.handle_exit(signal.SIGTERM, None)     # what uvicorn's SIGTERM handler calls
        with r.client() as c:                          # a new connection while draining
            h = c.get("/health")
            assert h.status_code == 503 and h.json()["status"] == "draining", h.text
            assert_error(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}), 503,
                         code="shutting_down")
        t.join(timeout=15)
        assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 16
        r.thread.join(timeout=15)
        assert not r.thread.is_alive()
        with pytest.raises(httpx.TransportError), r.client(timeout=2) as c:
            c.get("/health")


def test_sigterm_subprocess(tmp_path):
    """A real process: SIGTERM while a request is in flight -> /health 503 during the drain, the request
    completes, the process exits 0."""
    sp = ServerProcess(tmp_path, delay=0.05, shutdown_timeout_s=10)
    try:
        sp.wait_ready()
        out = {}

        def request():
            out["r"] = httpx.post(sp.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 20,
                                                                     "temperature": 0}, timeout=20)
        t = threading.Thread(target=request)
        t.start()
        assert wait_for(lambda: sp.health().json()["in_flight"] == 1)
        sp.sigterm()
        assert wait_for(lambda: sp.health().status_code == 503, timeout=2)
        assert sp.health().json()["status"] == "draining"
        t.join(timeout=20)
        body = out["r"].json()
        assert out["r"].status_code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 20
        assert sp.proc.wait(timeout=20) == 0
    finally:
        sp.close()
