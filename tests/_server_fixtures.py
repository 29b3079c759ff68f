"""Shared helpers of the server tests (tests/runtime/test_server*.py): a real uvicorn server on 127.0.0.1
(ephemeral port) in a thread or a subprocess, engines that make timing observable, SSE / metrics parsing."""
from __future__ import annotations

import contextlib
import functools
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

import httpx
import numpy as np

from rocket_deploy.runtime.engine import Engine
from rocket_deploy.runtime.server import ServerSettings, make_server

MODEL = "tiny"
LIMITS = dict(max_prompt_tokens=48, max_new_tokens=32, max_body_bytes=8192)
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about lists."}]


@functools.lru_cache(maxsize=None)
def tiny_engine():
    """One tiny random Llama (max_position_embeddings 256) + byte-level BPE tokenizer per test process."""
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
        self.max_context = inner.max_context
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
    def __init__(self, server, url, thread, port):
        self.server, self.url, self.thread, self.port = server, url, thread, port

    def client(self, timeout: float = 20.0, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, **kw)

    @property
    def service(self):
        return self.server.app.state.rocket


@contextlib.contextmanager
def running(engine: Engine, **settings):
    """A real uvicorn server (in a thread) serving ``engine``; stopped (and checked stopped) on exit."""
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
        yield Running(server, f"http://127.0.0.1:{port}", th, port)
    finally:
        server.should_exit = True
        th.join(timeout=15)
        sock.close()
        assert not th.is_alive(), "server thread did not stop"


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


def wait_for(cond, timeout: float = 5.0, every: float = 0.02) -> bool:
    t_end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > t_end:
            return False
        time.sleep(every)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``serve()`` in a real subprocess over a tiny Llama that sleeps ``delay`` s per forward."""

    def __init__(self, tmp_path, delay: float = 0.05, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = tmp_path / "srv.py"
        kw = ", ".join(f"{k}={v!r}" for k, v in {"model_name": MODEL, **settings}.items())
        script.write_text(textwrap.dedent(f"""
            import time
            import torch
            torch.set_num_threads(1)
            from rocket_deploy.runtime.server import ServerSettings, serve
            from rocket_deploy.runtime.torch_backend import TorchEngine
            from rocket_deploy.testing import tiny_llama, tiny_tokenizer

            class Slow(TorchEngine):
                def forward(self, *a):
                    time.sleep({delay})
                    return super().forward(*a)

            serve(Slow(tiny_llama(), tiny_tokenizer(), device="cpu"), "127.0.0.1", {self.port},
                  ServerSettings({kw}), log_level="warning")
        """))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 60.0) -> None:
        t_end = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < t_end, "server did not come up"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=2)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        out = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        return out
