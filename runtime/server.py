"""An OpenAI-compatible HTTP server over any :class:`~.engine.Engine` (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text format).

Concurrency model. Engines are synchronous and not thread-safe, so every engine and tokenizer call runs on ONE
worker thread (a single-thread executor); the event loop never blocks on the model. A request is *admitted* into
one of ``max_concurrent`` in-flight slots, or waits in a queue of at most ``max_queue``; beyond that it is answered
``429`` (queue full) and a request that waits past its deadline is answered ``503``, both with ``Retry-After``.
In-flight requests advance one token per worker task, so they interleave token by token (each keeps its own KV
state in the engine's opaque ``present``/``past``, as the :meth:`Engine.forward` contract requires).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, SamplingParams

log = logging.getLogger("rocket_deploy.server")

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics")


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Limits and identity of a server. Every limit is checked here, so a bad value fails before binding a port."""

    model_name: str = "rocket-model"
    max_prompt_tokens: int = 2048       # longest prompt (tokens, after the chat template)
    max_new_tokens: int = 512           # largest max_tokens a request may ask for; also the default
    max_concurrent: int = 4             # requests generating at once (interleaved token by token)
    max_queue: int = 16                 # requests waiting for a slot; more are answered 429
    request_timeout_s: float = 300.0    # whole-request deadline: queue wait (503) + generation (504)
    max_body_bytes: int = 1 << 20       # larger request bodies are answered 413
    shutdown_timeout_s: float = 30.0    # on SIGINT/SIGTERM: how long in-flight requests may finish
    retry_after_s: int = 1              # Retry-After header of 429/503 answers

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        for name, lo in (("max_prompt_tokens", 1), ("max_new_tokens", 1), ("max_concurrent", 1),
                         ("max_queue", 0), ("max_body_bytes", 64), ("retry_after_s", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < lo:
                raise ValueError(f"{name} must be >= {lo}, got {v}")
        for name in ("request_timeout_s", "shutdown_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v!r}")


# ---------------------------------------------------------------------------------------------------------------
# errors (OpenAI shape)
# ---------------------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------------
# request parsing and validation
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenRequest:
    kind: str                                   # "completion" | "chat"
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None               # None: the server default (and what the context allows)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _type_name(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None, hi_hint: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {_type_name(v)}", name, "invalid_type")
    if lo is not None and v < lo:
        raise _bad(f"'{name}' must be >= {lo}, got {v}", name, "invalid_value")
    if hi is not None and v > hi:
        raise _bad(f"'{name}' must be <= {hi}{hi_hint}, got {v}", name, "invalid_value")
    return v


def _opt_float(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{name}' must be a number, got {_type_name(v)}", name, "invalid_type")
    v = float(v)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"'{name}' must be in {rng}, got {v}", name, "invalid_value")
    return v


def _opt_bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean, got {_type_name(v)}", name, "invalid_type")
    return v


def _parse_common(body: dict, settings: ServerSettings, req: GenRequest) -> GenRequest:
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad(f"'model' must be a string, got {_type_name(model)}", "model", "invalid_type")
        if model != settings.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{settings.model_name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")
    hint = " (this server's --max-new-tokens)"
    req.max_tokens = _opt_int(body, "max_tokens", 1, settings.max_new_tokens, hint)
    if req.kind == "chat":
        mct = _opt_int(body, "max_completion_tokens", 1, settings.max_new_tokens, hint)
        req.max_tokens = mct if mct is not None else req.max_tokens
    t = _opt_float(body, "temperature", 0.0, 2.0)
    req.temperature = 1.0 if t is None else t
    p = _opt_float(body, "top_p", 0.0, 1.0, lo_open=True)
    req.top_p = 1.0 if p is None else p
    k = _opt_int(body, "top_k", -1)
    req.top_k = 0 if k is None or k == -1 else k
    req.seed = _opt_int(body, "seed", 0, 2 ** 63 - 1)
    req.stream = bool(_opt_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad(f"'stream_options' must be an object, got {_type_name(so)}", "stream_options", "invalid_type")
        req.include_usage = bool(_opt_bool(so, "include_usage"))
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
        if len(stops) > MAX_STOP_STRINGS:
            raise _bad(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise _bad(f"each stop string must be 1..{MAX_STOP_CHARS} characters", "stop", "invalid_value")
        req.stop = tuple(dict.fromkeys(stops))
    # Options this server does not implement: refuse rather than silently ignore a non-default value.
    unsupported = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
                   "presence_penalty": 0, "frequency_penalty": 0, "tools": None, "logit_bias": None}
    for name, default in unsupported.items():
        v = body.get(name)
        if v is not None and v != default and not (name in ("logprobs", "tools", "logit_bias") and not v):
            raise _bad(f"'{name}' = {json.dumps(v)[:40]} is not supported by this server", name, "unsupported")
    return req


def parse_completion_request(body: Any, settings: ServerSettings) -> GenRequest:
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    req = GenRequest(kind="completion")
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("missing required field 'prompt' (a string or an array of token ids)", "prompt", "missing")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                      # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' is empty", "prompt", "empty_prompt")
        req.prompt = prompt
    elif isinstance(prompt, list):
        if not prompt:
            raise _bad("'prompt' is empty", "prompt", "empty_prompt")
        if all(isinstance(x, str) for x in prompt):
            raise _bad("batched prompts (an array of strings) are not supported; send one prompt per request",
                       "prompt", "unsupported")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            raise _bad("'prompt' must be a string or an array of integer token ids", "prompt", "invalid_type")
        req.prompt_ids = list(prompt)
    else:
        raise _bad(f"'prompt' must be a string or an array of token ids, got {_type_name(prompt)}", "prompt",
                   "invalid_type")
    return _parse_common(body, settings, req)


def parse_chat_request(body: Any, settings: ServerSettings) -> GenRequest:
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    req = GenRequest(kind="chat")
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("missing required field 'messages' (an array of {role, content})", "messages", "missing")
    if not isinstance(msgs, list):
        raise _bad(f"'messages' must be an array, got {_type_name(msgs)}", "messages", "invalid_type")
    if not msgs:
        raise _bad("'messages' is empty", "messages", "empty_prompt")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object, got {_type_name(m)}", where, "invalid_type")
        role = m.get("role")
        if role is None:
            raise _bad(f"missing required field '{where}.role'", f"{where}.role", "missing")
        if not isinstance(role, str):
            raise _bad(f"'{where}.role' must be a string, got {_type_name(role)}", f"{where}.role", "invalid_type")
        if role not in ROLES:
            raise _bad(f"unknown role '{role}' in '{where}.role'; expected one of {', '.join(ROLES)}",
                       f"{where}.role", "invalid_value")
        content = m.get("content")
        if content is None:
            raise _bad(f"missing required field '{where}.content'", f"{where}.content", "missing")
        if isinstance(content, list):          # content parts: only text parts are supported
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}",
                               f"{where}.content", "unsupported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string or an array of text parts, got {_type_name(content)}",
                       f"{where}.content", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if not any(m["content"] for m in out):
        raise _bad("all messages are empty", "messages", "empty_prompt")
    req.messages = out
    return _parse_common(body, settings, req)


# ---------------------------------------------------------------------------------------------------------------
# text generation: detokenization, stop strings (synchronous; runs on the engine worker thread)
# ---------------------------------------------------------------------------------------------------------------
class TextGeneration:
    """Drives :meth:`Engine.stream_tokens` one token per :meth:`step` and turns tokens into text deltas.

    Text is released only when it is final: a trailing incomplete UTF-8 character (``\\ufffd``) and a trailing
    piece that could be the start of a stop string are held back until the next token decides them, so the
    concatenated deltas equal the non-streamed text. A stop string ends generation and is cut from the text."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, stop: tuple[str, ...] = ()):
        self._tok = engine.tokenizer
        self._stats: dict = {}
        self._gen = engine.stream_tokens(prompt_ids, params, self._stats)
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""                  # released text so far
        self.done = False
        self.finish_reason: str | None = None

    def _decode(self) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(self.token_ids, skip_special_tokens=True)

    def step(self) -> str:
        """Generate one token; return the newly released text (maybe empty). Sets ``done`` at the end."""
        if self.done:
            return ""
        try:
            self.token_ids.append(int(next(self._gen)))
        except StopIteration:
            return self._finish(self._stats.get("finish_reason", "length"))
        full = self._decode()
        start = len(self.text)
        if self.stop:
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.close()
                return self._finish("stop", full[:min(hits)])
        end = len(full)
        while end > start and full[end - 1] == "\ufffd":          # incomplete UTF-8 sequence: wait
            end -= 1
        hold = 0                                                   # a possible stop-string start: wait
        for s in self.stop:
            for k in range(min(len(s) - 1, end - start), hold, -1):
                if full.endswith(s[:k], 0, end):
                    hold = k
                    break
        end -= hold
        delta = full[start:end] if end > start else ""
        self.text += delta
        return delta

    def _finish(self, reason: str, full: str | None = None) -> str:
        full = self._decode() if full is None else full
        delta = full[len(self.text):]
        self.text += delta
        self.done, self.finish_reason = True, reason
        return delta

    def close(self) -> None:
        """Stop generating (frees the KV state). Call on the worker thread, or when no step is running."""
        self._gen.close()


# ---------------------------------------------------------------------------------------------------------------
# metrics (Prometheus text exposition format)
# ---------------------------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum:.6f}", f"{name}_count{lab} {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttft = _Histogram()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejections: dict[str, int] = {}
        self.disconnects = 0
        self.in_flight = 0
        self.waiting = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, _Histogram()).observe(seconds)

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def render(self) -> str:
        with self._lock:
            L = ["# HELP rocket_requests_total HTTP requests by endpoint and status code.",
                 "# TYPE rocket_requests_total counter"]
            L += [f'rocket_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            L += ["# HELP rocket_prompt_tokens_total Prompt tokens processed.",
                  "# TYPE rocket_prompt_tokens_total counter", f"rocket_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP rocket_generation_tokens_total Tokens generated.",
                  "# TYPE rocket_generation_tokens_total counter",
                  f"rocket_generation_tokens_total {self.completion_tokens}",
                  "# HELP rocket_requests_in_flight Generation requests holding a slot.",
                  "# TYPE rocket_requests_in_flight gauge", f"rocket_requests_in_flight {self.in_flight}",
                  "# HELP rocket_requests_waiting Generation requests queued for a slot.",
                  "# TYPE rocket_requests_waiting gauge", f"rocket_requests_waiting {self.waiting}",
                  "# HELP rocket_queue_rejections_total Requests refused by admission control, by reason.",
                  "# TYPE rocket_queue_rejections_total counter"]
            for reason in ("queue_full", "queue_timeout", "shutting_down"):
                L.append(f'rocket_queue_rejections_total{{reason="{reason}"}} {self.rejections.get(reason, 0)}')
            L += ["# HELP rocket_client_disconnects_total Streams stopped because the client went away.",
                  "# TYPE rocket_client_disconnects_total counter",
                  f"rocket_client_disconnects_total {self.disconnects}",
                  "# HELP rocket_request_latency_seconds Request latency (whole stream for streaming) by endpoint.",
                  "# TYPE rocket_request_latency_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                L += h.lines("rocket_request_latency_seconds", f'endpoint="{e}"')
            L += ["# HELP rocket_time_to_first_token_seconds Time from admission to the first generated token.",
                  "# TYPE rocket_time_to_first_token_seconds histogram"]
            L += self.ttft.lines("rocket_time_to_first_token_seconds")
            return "\n".join(L) + "\n"


class _MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by endpoint and final status and times it (a streaming
    response is timed to its last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS or path.startswith("/v1/models/") else "other"
        endpoint = "/v1/models" if endpoint.startswith("/v1/models/") else endpoint
        status = 500
        t0 = time.perf_counter()

        async def _send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------------------
# admission control
# ---------------------------------------------------------------------------------------------------------------
class Admission:
    """At most ``max_concurrent`` holders and ``max_queue`` FIFO waiters; a released slot is handed straight to
    the oldest waiter. Used from the event loop only."""

    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self._free = settings.max_concurrent
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.draining = False

    def _retry(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def _sync_gauge(self) -> None:
        self.metrics.waiting = sum(1 for w in self._waiters if not w.done())

    async def acquire(self, deadline: float) -> None:
        m = self.metrics
        if self.draining:
            m.reject("shutting_down")
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down",
                           headers=self._retry())
        if self._free > 0 and not self._waiters:
            self._free -= 1
            m.in_flight += 1
            return
        if len(self._waiters) >= self.settings.max_queue:
            m.reject("queue_full")
            raise APIError(429, f"the server is busy ({self.settings.max_concurrent} requests in flight, "
                                f"{len(self._waiters)} queued); retry later", "rate_limit_error",
                           code="queue_full", headers=self._retry())
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._sync_gauge()
        try:
            await asyncio.wait({fut}, timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:           # cancelled while queued: hand back a slot we may have been given
            if fut.done() and not fut.cancelled():
                m.in_flight += 1
                self.release()
            else:
                self._forget(fut)
            raise
        if fut.done() and not fut.cancelled():
            m.in_flight += 1
            return
        self._forget(fut)
        m.reject("queue_timeout")
        raise APIError(503, f"timed out after {self.settings.request_timeout_s:g}s waiting for a free slot; "
                            f"retry later", "server_error", code="queue_timeout", headers=self._retry())

    def _forget(self, fut: asyncio.Future) -> None:
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)
        self._sync_gauge()

    def release(self) -> None:
        self.metrics.in_flight -= 1
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(True)      # the slot goes straight to the oldest waiter
                self._sync_gauge()
                return
        self._free += 1
        self._sync_gauge()


# ---------------------------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------------------------
class _Job:
    """One admitted generation request: owns a slot until :meth:`release` (idempotent, synchronous)."""

    def __init__(self, server: "_Server", gen: TextGeneration, prompt_tokens: int, deadline: float,
                 admitted_at: float):
        self.server, self.gen, self.prompt_tokens, self.deadline = server, gen, prompt_tokens, deadline
        self.admitted_at = admitted_at
        self.released = False
        self.first_token = False
        self.pending = ""           # text released by the first step (run before the response starts)

    async def step(self) -> str:
        if time.monotonic() > self.deadline:
            raise APIError(504, f"the request took longer than {self.server.settings.request_timeout_s:g}s "
                                f"(request_timeout_s)", "server_error", code="timeout")
        delta = await self.server.call(self.gen.step)
        if not self.first_token and self.gen.token_ids:
            self.first_token = True
            self.server.metrics.ttft.observe(time.monotonic() - self.admitted_at)
        return delta

    def release(self, disconnected: bool = False) -> None:
        if self.released:
            return
        self.released = True
        if not self.gen.done:
            if disconnected:
                self.server.metrics.disconnects += 1
            self.server.submit_quietly(self.gen.close)   # after any step still running on the worker
        self.server.metrics.add_tokens(completion=len(self.gen.token_ids))
        self.server.admission.release()


class _Server:
    def __init__(self, engine: Engine, settings: ServerSettings):
        self.engine, self.settings = engine, settings
        self.metrics = Metrics()
        self.admission = Admission(settings, self.metrics)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rocket-engine")
        self.created = int(time.time())
        self.max_context = getattr(engine, "max_context", None)
        tok = engine.tokenizer
        self.vocab_size = len(tok) if tok is not None else None

    async def call(self, fn: Callable, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except RuntimeError as e:
            if "shutdown" in str(e):
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            raise

    def submit_quietly(self, fn: Callable) -> None:
        try:
            self.executor.submit(fn)
        except RuntimeError:        # executor already shut down: the worker is gone, closing is safe here
            with contextlib.suppress(Exception):
                fn()

    async def start(self, req: GenRequest, t_arrival: float) -> _Job:
        """Admit, tokenize, check limits, prefill and generate the first token (so that errors in any of these
        are answered with a status code, also for streams)."""
        deadline = t_arrival + self.settings.request_timeout_s
        await self.admission.acquire(deadline)
        admitted_at = time.monotonic()
        job = None
        try:
            ids = await self._prompt_ids(req)
            n = len(ids)
            if n == 0:
                raise _bad("the prompt is empty after tokenization", "prompt", "empty_prompt")
            if n > self.settings.max_prompt_tokens:
                raise _bad(f"the prompt is {n} tokens, longer than this server's limit of "
                           f"{self.settings.max_prompt_tokens} (--max-prompt-tokens)",
                           "messages" if req.kind == "chat" else "prompt", "context_length_exceeded")
            max_tokens = req.max_tokens if req.max_tokens is not None else self.settings.max_new_tokens
            if self.max_context:
                room = int(self.max_context) - n
                if req.max_tokens is None:
                    max_tokens = min(max_tokens, room)
                if max_tokens < 1 or n + max_tokens > self.max_context:
                    raise _bad(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
                               f"{self.max_context} tokens", "max_tokens", "context_length_exceeded")
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed)
            gen = TextGeneration(self.engine, ids, params, req.stop)
            job = _Job(self, gen, n, deadline, admitted_at)
            self.metrics.add_tokens(prompt=n)
            try:
                job.pending = await job.step()      # prefill + first token
            except ValueError as e:                 # the engine refused the input (e.g. a context limit)
                raise _bad(f"the model refused the request: {e}", "prompt", "invalid_prompt")
            return job
        except BaseException:
            if job is not None:
                job.release()
            else:
                self.admission.release()
            raise

    async def _prompt_ids(self, req: GenRequest) -> list[int]:
        if req.prompt_ids is not None:
            if self.vocab_size is not None:
                bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise _bad(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt",
                               "invalid_value")
            elif any(t < 0 for t in req.prompt_ids):
                raise _bad("token ids must be >= 0", "prompt", "invalid_value")
            return list(req.prompt_ids)
        if self.engine.tokenizer is None:
            raise _bad("this model has no tokenizer: send 'prompt' as an array of token ids",
                       "messages" if req.kind == "chat" else "prompt", "no_tokenizer")
        try:
            if req.kind == "chat":
                return await self.call(lambda: self.engine.encode_prompt(messages=req.messages))
            return await self.call(lambda: self.engine.encode_prompt(req.prompt))
        except APIError:
            raise
        except Exception as e:      # e.g. no chat template, or the template rejects the roles / their order
            raise _bad(f"could not build the prompt: {e}", "messages" if req.kind == "chat" else "prompt",
                       "invalid_prompt")


def _error_response(err: APIError):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_json(request, settings: ServerSettings) -> Any:
    ctype = request.headers.get("content-type")
    if ctype is not None:
        mime = ctype.split(";", 1)[0].strip().lower()
        if mime != "application/json" and not mime.endswith("+json"):
            raise APIError(415, f"unsupported content type '{mime}'; send JSON with 'Content-Type: "
                                f"application/json'", code="unsupported_media_type")
    limit = settings.max_body_bytes
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            f"(--max-body-bytes)", code="request_too_large")
    clen = request.headers.get("content-length")
    declared = None
    if clen is not None:
        try:
            declared = int(clen)
        except ValueError:
            raise _bad("invalid Content-Length header")
    chunks, size = [], 0
    drain_cap = max(4 * limit, 8 << 20)   # read (and drop) an oversized body up to this, so the client sees the 413
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit and (declared is None or declared <= limit):
            chunks.append(chunk)
        elif size > drain_cap:
            break
    if size > limit or (declared is not None and declared > limit):
        raise too_big
    raw = b"".join(chunks)
    if not raw.strip():
        raise _bad("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON: {e}", None, "invalid_json")


def create_app(engine: Engine, settings: ServerSettings | None = None):
    """Build the FastAPI app serving ``engine``. ``app.state.rocket`` holds the server state (metrics, admission)."""
    settings = settings or ServerSettings()
    srv = _Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        srv.admission.draining = True
        srv.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rocket-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.rocket = srv
    app.add_middleware(_MetricsMiddleware, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail))
        return _error_response(APIError(exc.status_code, msg, code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                        code="internal_error"))

    def _model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": srv.created, "owned_by": "rocket-deploy"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist", param="model", code="model_not_found")
        return _model_card()

    @app.get("/health")
    async def health():
        m = srv.metrics
        body = {"status": "draining" if srv.admission.draining else "ok", "model": settings.model_name,
                "backend": engine.backend, "is_decoder": bool(engine.is_decoder), "in_flight": m.in_flight,
                "waiting": m.waiting}
        return JSONResponse(body, status_code=503 if srv.admission.draining else 200)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.render(), media_type="text/plain; version=0.0.4")

    async def generation(request: Request, kind: str):
        t_arrival = time.monotonic()
        body = await _read_json(request, settings)
        if not engine.is_decoder:
            raise APIError(400, f"the served model is an encoder ({engine.backend} backend): it cannot generate "
                                f"text, so {request.url.path} is unavailable", code="model_not_generative")
        req = (parse_chat_request if kind == "chat" else parse_completion_request)(body, settings)
        if req.stop and engine.tokenizer is None:
            raise _bad("stop strings need a tokenizer; this model has none", "stop", "no_tokenizer")
        job = await srv.start(req, t_arrival)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if not req.stream:
            try:
                text = job.pending
                while not job.gen.done:
                    text += await job.step()
            finally:
                job.release()
            return _final_body(kind, rid, created, settings.model_name, job, text)
        return _SSEResponse(_sse(kind, rid, created, settings.model_name, job, req.include_usage), job,
                            media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, "chat")

    class _SSEResponse(StreamingResponse):
        """Releases the job's slot however the response ends (finished, client gone, server cancelled)."""

        def __init__(self, content, job: _Job, **kw):
            super().__init__(content, **kw)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.release(disconnected=True)     # no-op unless the stream was abandoned mid-way

    return app


def _usage(job: _Job) -> dict:
    c = len(job.gen.token_ids)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": c, "total_tokens": job.prompt_tokens + c}


def _final_body(kind: str, rid: str, created: int, model: str, job: _Job, text: str) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": job.gen.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": job.gen.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": _usage(job)}


def _sse_event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _sse(kind: str, rid: str, created: int, model: str, job: _Job, include_usage: bool):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta_text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if kind == "chat":
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if delta_text is not None:
                delta["content"] = delta_text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    finished = False                # True once the stream ended on its own (done or an error reported)
    try:
        if kind == "chat":
            yield _sse_event(chunk("", role=True))
        if job.pending:
            yield _sse_event(chunk(job.pending))
        while not job.gen.done:
            delta = await job.step()
            if delta:
                yield _sse_event(chunk(delta))
        yield _sse_event(chunk(None if kind == "chat" else "", finish=job.gen.finish_reason))
        finished = True
        job.release()
        if include_usage:
            yield _sse_event({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                              "usage": _usage(job)})
        yield "data: [DONE]\n\n"
    except APIError as e:
        finished = True
        job.release()
        yield _sse_event(e.body())
    except Exception as e:          # noqa: BLE001 -- the status line is sent; report in-band and end the stream
        finished = True
        job.release()
        log.exception("error while streaming")
        yield _sse_event(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                  code="internal_error").body())
    finally:
        job.release(disconnected=not finished)


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
                log_level: str = "info"):
    """A configured ``uvicorn.Server`` (not started). On SIGINT/SIGTERM it stops accepting connections, lets
    in-flight requests finish for up to ``settings.shutdown_timeout_s``, cancels what is left and returns."""
    import uvicorn

    settings = settings or ServerSettings()
    app = create_app(engine, settings)

    class _UvicornServer(uvicorn.Server):
        def handle_exit(self, sig, frame):           # the signal handler: start draining at once
            app.state.rocket.admission.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # Like uvicorn's, minus re-raising the signal after the drain: a graceful stop returns normally
            # (exit status 0) instead of dying of SIGTERM / raising KeyboardInterrupt.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=settings.shutdown_timeout_s, lifespan="on",
                            timeout_keep_alive=5)
    server = _UvicornServer(config)
    server.app = app
    return server


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings | None = None,
          log_level: str = "info") -> None:
    """Serve ``engine`` over HTTP until SIGINT/SIGTERM (blocking); returns after the graceful shutdown."""
    make_server(engine, host, port, settings, log_level).run()
    log.info("server stopped")
