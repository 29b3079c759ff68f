"""Prometheus metrics of one server (``prometheus_client``, a registry per app) and the middleware that counts
every HTTP request by endpoint and final status."""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
KNOWN_PATHS = GENERATION_PATHS + ("/v1/models", "/health", "/metrics")
REJECTION_REASONS = ("queue_full", "queue_timeout", "shutting_down")


class Metrics:
    """The server's metrics; ``in_flight`` and ``waiting`` are read from the admission control when scraped."""

    def __init__(self, in_flight: Callable[[], float] = lambda: 0, waiting: Callable[[], float] = lambda: 0):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("rocket_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("rocket_request_latency_seconds",
                                 "Request latency (whole stream for streaming) by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("rocket_time_to_first_token_seconds",
                              "Time from admission to the first generated token.", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.prompt_tokens = Counter("rocket_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("rocket_generation_tokens", "Tokens generated.", registry=r)
        Gauge("rocket_requests_in_flight", "Generation requests holding a slot.",
              registry=r).set_function(in_flight)
        Gauge("rocket_requests_waiting", "Generation requests queued for a slot.", registry=r).set_function(waiting)
        self.rejections = Counter("rocket_queue_rejections", "Requests refused by admission control, by reason.",
                                  ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)            # exported as 0 before the first rejection
        self.disconnects = Counter("rocket_client_disconnects",
                                   "Requests stopped because the client went away.", registry=r)
        ProcessCollector(registry=r)                  # process_resident_memory_bytes & co (Linux)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def add_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if completion:
            self.completion_tokens.inc(completion)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition (body, content type), in the format the scraper's ``Accept`` header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in KNOWN_PATHS else "other"


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by endpoint and final status and times it (a streaming
    response is timed to its last byte)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = endpoint_label(scope.get("path", ""))
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
