"""The backend-neutral inference interface.

A backend implements :meth:`Engine.forward` (one step of a decoder with its KV cache, or one encoder pass);
generation, sampling, streaming and chat templates are written once here on top of it.
"""
from __future__ import annotations

import abc
import dataclasses
import math
import os
import time
from typing import Any, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 -> off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str            # "stop" | "length"
    prompt_tokens: int
    prefill_s: float
    decode_s: float


class Engine(abc.ABC):
    """A loaded model. ``forward`` is the only method a backend must provide for generation."""

    backend: str = "abstract"
    is_decoder: bool = True
    tokenizer: Any = None
    max_context: int | None = None    # longest past + new tokens the model takes (None: unknown / unbounded)

    # ---- backend hooks -------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any | None) -> tuple[np.ndarray, Any]:
        """Run one step. ``input_ids`` and ``attention_mask`` are int64 ``[batch, seq]`` (the mask covers past +
        new tokens). Returns ``(logits [batch, seq, vocab] float32, present)``; ``present`` is opaque state that
        is passed back as ``past``. Encoders return ``last_hidden_state`` and ``None``."""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the raw graph with named feeds (backends that have a graph override this)."""
        raise NotImplementedError(f"{self.backend} engine has no raw graph interface")

    def model_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass

    # ---- generation, written once ----------------------------------------------------------------
    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise RuntimeError("this engine has no tokenizer; pass token ids")
        if messages is not None:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("the model's tokenizer has no chat template; use a plain prompt")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(prompt or "", add_special_tokens=True)["input_ids"])

    def default_stop_ids(self) -> tuple[int, ...]:
        tok = self.tokenizer
        ids = set()
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return tuple(sorted(ids))

    def stream_tokens(self, prompt_ids: list[int] | np.ndarray, params: SamplingParams = SamplingParams(),
                      stats: dict | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time (batch of one), using the KV cache."""
        if not self.is_decoder:
            raise RuntimeError("generation needs a decoder model; this is an encoder")
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        rng = np.random.default_rng(params.seed)
        stop = set(params.stop_token_ids) or set(self.default_stop_ids())
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        logits, past = self.forward(ids, mask, None)
        t1 = time.perf_counter()
        if stats is not None:
            stats.update(prefill_s=t1 - t0, prompt_tokens=int(ids.shape[1]), decode_s=0.0, finish_reason="length")
        for step in range(params.max_new_tokens):
            nxt = sample_next(logits[0, -1], params, rng)
            yield nxt
            if nxt in stop:
                if stats is not None:
                    stats["finish_reason"] = "stop"
                return
            if step == params.max_new_tokens - 1:
                return
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            ts = time.perf_counter()
            logits, past = self.forward(np.array([[nxt]], dtype=np.int64), mask, past)
            if stats is not None:
                stats["decode_s"] += time.perf_counter() - ts

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 prompt_ids: list[int] | None = None, params: SamplingParams = SamplingParams()) -> GenerationResult:
        ids = list(prompt_ids) if prompt_ids is not None else self.encode_prompt(prompt, messages)
        stats: dict = {}
        out = list(self.stream_tokens(ids, params, stats))
        text = self.tokenizer.decode(out, skip_special_tokens=True) if self.tokenizer is not None else ""
        return GenerationResult(out, text, stats.get("finish_reason", "length"), len(ids),
                                stats.get("prefill_s", 0.0), stats.get("decode_s", 0.0))


def context_from_config(config: Any) -> int | None:
    """A model's maximum positions from its HF config (an object or a ``config.json`` dict), or None."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def sample_next(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0, else temperature / top-k / top-p sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits / params.temperature
    if params.top_k and params.top_k < z.size:     # top_k >= vocab keeps everything
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, params.top_p)) + 1
        keep = order[:cut]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


def open_engine(path: str | os.PathLike, backend: str | None = None, **kwargs) -> Engine:
    """Open a model for inference, choosing the backend from the path (:mod:`rocket_deploy.runtime.backends`):
    an artifact directory (torch), ``.onnx`` or an export folder (ONNX Runtime), ``.plan``/``.engine`` (TensorRT)."""
    from .backends import open_backend
    return open_backend(path, backend, **kwargs)
