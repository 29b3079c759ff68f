"""Latency / throughput measurement over any :class:`Engine` (pure measurement code; no printing).

A "generation" is one prefill of ``prompt_len`` random tokens (empty KV cache) followed by ``gen_len - 1`` greedy
decode steps, for a batch of ``batch`` sequences. Per batch size we report the full-generation latency
(min / mean / p50 / p90 / p95 / p99 / max / stddev over ``runs``; :func:`latency_stats`), the prefill time, the decode throughput (generated tokens per second
of decode time, all sequences of the batch counted), the model's bytes and the process's peak RSS (high-water mark;
plus the CUDA allocator's peak where torch uses a GPU). Encoders: one pass over ``[batch, prompt_len]`` tokens.

:func:`bench_side_by_side` interleaves the runs of several engines (A B C A B C ...), so that a shared or throttling
machine slows all of them alike -- use it to compare models.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .engine import Engine


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1,)
    prompt_len: int = 128
    gen_len: int = 64
    warmup: int = 1
    runs: int = 5
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        if self.prompt_len < 1 or self.gen_len < 1:
            raise ValueError("prompt_len and gen_len must be >= 1")
        if self.warmup < 0 or self.runs < 1:
            raise ValueError("warmup must be >= 0 and runs >= 1")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def gpu_peak_bytes() -> int | None:
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # noqa: BLE001
        pass
    return None


def _prompt(engine: Engine, batch: int, prompt_len: int, seed: int) -> np.ndarray:
    vocab = 256
    tok = getattr(engine, "tokenizer", None)
    if tok is not None and getattr(tok, "vocab_size", None):
        vocab = int(tok.vocab_size)
    rng = np.random.default_rng(seed)
    return rng.integers(4, max(vocab, 8), size=(batch, prompt_len), dtype=np.int64)


def one_generation(engine: Engine, ids: np.ndarray, gen_len: int) -> dict[str, float]:
    """Prefill + ``gen_len - 1`` greedy decode steps; returns seconds and generated tokens."""
    batch = ids.shape[0]
    mask = np.ones_like(ids)
    t0 = time.perf_counter()
    logits, past = engine.forward(ids, mask, None)
    t1 = time.perf_counter()
    if not engine.is_decoder:
        return {"total_s": t1 - t0, "prefill_s": t1 - t0, "decode_s": 0.0, "decode_tokens": 0, "tokens": []}
    nxt = logits[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
    tokens = [nxt[:, 0].copy()]
    for _ in range(gen_len - 1):
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        logits, past = engine.forward(nxt, mask, past)
        nxt = logits[:, -1].argmax(-1).reshape(batch, 1).astype(np.int64)
        tokens.append(nxt[:, 0].copy())
    t2 = time.perf_counter()
    return {"total_s": t2 - t0, "prefill_s": t1 - t0, "decode_s": t2 - t1, "decode_tokens": batch * (gen_len - 1),
            "tokens": np.stack(tokens, 1)}


MIN_RUNS_FOR_PERCENTILES = 20     # below this, p95 / p99 are the slowest run or two, not a tail estimate


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """min / mean / p50 / p90 / p95 / p99 / max / population stddev of latencies in milliseconds (linear
    interpolation between order statistics, numpy's default)."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("latency_stats needs at least one sample")
    p50, p90, p95, p99 = (float(v) for v in np.percentile(a, [50, 90, 95, 99]))
    return {"min": float(a.min()), "mean": float(a.mean()), "p50": p50, "p90": p90, "p95": p95, "p99": p99,
            "max": float(a.max()), "stddev": float(a.std())}


def few_runs_warning(runs: int) -> str | None:
    """The warning to show when percentiles rest on fewer than :data:`MIN_RUNS_FOR_PERCENTILES` runs, else None."""
    if runs >= MIN_RUNS_FOR_PERCENTILES:
        return None
    return (f"percentiles rest on {runs} run(s) per batch size (p95/p99 are then just the slowest runs); use "
            f"--runs {MIN_RUNS_FOR_PERCENTILES} or more for tail latencies")


def environment(engine: Engine | None = None, threads: int | None = None) -> dict[str, Any]:
    """Where the numbers were measured: backend, providers, threads, library versions, CPU and GPU names."""
    import platform
    from importlib import metadata
    versions = {}
    for lib in ("torch", "onnxruntime", "transformers", "rocket-deploy"):
        try:
            versions[lib.replace("-", "_")] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib.replace("-", "_")] = None
    out: dict[str, Any] = {"backend": getattr(engine, "backend", None),
                           "providers": list(getattr(engine, "providers", None) or []) or None,
                           "threads": threads, "versions": versions, "cpu": cpu_name(), "gpu": gpu_name(),
                           "python": platform.python_version()}
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor`)."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    """The CUDA device's name when torch sees one, else None."""
    try:
        import torch
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001
        pass
    return None


def summarize(samples: list[dict[str, float]], batch: int, cfg: BenchConfig, encoder: bool) -> dict[str, Any]:
    tot = np.array([s["total_s"] for s in samples]) * 1e3
    pre = np.array([s["prefill_s"] for s in samples]) * 1e3
    dec = np.array([s["decode_s"] for s in samples])
    ntok = samples[0]["decode_tokens"]
    row = {"batch": batch, "prompt_len": cfg.prompt_len, "gen_len": 0 if encoder else cfg.gen_len,
           "runs": len(samples)}
    row.update({f"latency_ms_{k}": v for k, v in latency_stats(tot).items()})
    row["latency_ms_median"] = row["latency_ms_p50"]     # the older name, kept for scripts reading it
    row["prefill_ms_median"] = float(np.median(pre))
    if encoder:
        row["tokens_per_s"] = batch * cfg.prompt_len / float(np.median(tot) / 1e3)
        row["decode_tokens_per_s"] = None
        row["decode_ms_per_step"] = None
    else:
        med = float(np.median(dec))
        row["decode_tokens_per_s"] = ntok / med if med > 0 else None
        row["decode_ms_per_step"] = med * 1e3 / max(cfg.gen_len - 1, 1)
        row["prefill_tokens_per_s"] = batch * cfg.prompt_len / float(np.median(pre) / 1e3)
    return row


def bench_side_by_side(engines: Mapping[str, Engine], cfg: BenchConfig = BenchConfig(),
                       progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
    """Benchmark several engines with interleaved runs. Returns ``{name: {"rows": [...], "model_bytes", ...}}``."""
    results: dict[str, dict[str, Any]] = {n: {"backend": e.backend, "model_bytes": int(e.model_bytes()),
                                              "is_decoder": bool(e.is_decoder), "rows": []}
                                          for n, e in engines.items()}
    for batch in cfg.batches:
        ids = {n: _prompt(e, batch, cfg.prompt_len, cfg.seed) for n, e in engines.items()}
        for n, e in engines.items():
            for w in range(cfg.warmup):
                one_generation(e, ids[n], cfg.gen_len)
                if progress:
                    progress(f"batch {batch}: warmup {w + 1}/{cfg.warmup}")
        samples: dict[str, list] = {n: [] for n in engines}
        for r in range(cfg.runs):
            for n, e in engines.items():
                samples[n].append(one_generation(e, ids[n], cfg.gen_len))
            if progress:
                ms = "  ".join(f"{samples[n][-1]['total_s'] * 1e3:.1f} ms" for n in engines)
                progress(f"batch {batch}: run {r + 1}/{cfg.runs}  {ms}")
        for n, e in engines.items():
            row = summarize(samples[n], batch, cfg, not e.is_decoder)
            results[n]["rows"].append(row)
    peak, gpu = peak_rss_bytes(), gpu_peak_bytes()
    for res in results.values():
        res["peak_rss_bytes"] = peak
        res["gpu_peak_bytes"] = gpu
    return results


def bench_engine(engine: Engine, cfg: BenchConfig = BenchConfig(), progress=None) -> dict[str, Any]:
    """Benchmark one engine (see module doc)."""
    return bench_side_by_side({"model": engine}, cfg, progress)["model"]


def greedy_tokens(engine: Engine, prompt_ids: Sequence[int], steps: int) -> list[int]:
    """Greedy continuation of one prompt through the engine's KV cache (for cross-backend equality checks)."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
    return [int(t) for t in one_generation(engine, ids, steps)["tokens"][0]]

