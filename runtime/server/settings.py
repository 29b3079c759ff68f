"""The server's limits and identity, checked on construction (a bad value fails before a port is bound)."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Limits and identity of a server. Every limit is checked here, so a bad value fails before binding a port.

    Each ``ValueError`` starts with the field's name (the CLI maps it back to its flag)."""

    model_name: str = "rocket-model"
    max_prompt_tokens: int = 2048       # longest prompt (tokens, after the chat template)
    max_new_tokens: int = 512           # largest max_tokens a request may ask for; also the default
    max_concurrent: int = 4             # requests generating at once (interleaved token by token)
    max_queue: int = 16                 # requests waiting for a slot; more are answered 429
    request_timeout_s: float = 300.0    # whole-request deadline: queue wait (503) + generation (504)
    max_body_bytes: int = 1 << 20       # larger request bodies are answered 413
    shutdown_timeout_s: float = 30.0    # on SIGINT/SIGTERM: how long in-flight requests may finish
    retry_after_s: int = 1              # Retry-After header of 429/503 answers
    header_timeout_s: float = 10.0      # a connection must deliver a request's complete headers within this (408)
    body_timeout_s: float = 30.0        # ... and its complete body within this after the headers (408)
    api_key: str | None = dataclasses.field(default=None, repr=False)   # required as `Authorization: Bearer`

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
        for name in ("request_timeout_s", "shutdown_timeout_s", "header_timeout_s", "body_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {v!r}")
        key = self.api_key
        if key is not None and (not isinstance(key, str) or not key or not key.isascii() or not key.isprintable()
                                or any(c.isspace() for c in key)):
            raise ValueError("api_key must be a non-empty string of printable ASCII characters without spaces "
                             "(it is sent as `Authorization: Bearer <key>`)")
