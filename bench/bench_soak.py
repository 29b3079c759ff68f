"""Bounded soak of the OpenAI-compatible server: N concurrent clients for T seconds over loopback (127.0.0.1 only)
against a tiny random Llama served by `rocket_deploy.runtime.server.serve` in a subprocess.

Each client loops over a mix of requests:

* ``complete`` / ``chat`` -- non-streaming generations (must answer 200, or 429/503 under load);
* ``stream`` -- a streamed chat read to ``[DONE]``;
* ``drop_stream`` / ``drop_plain`` -- the client disconnects mid-stream / before a non-streamed answer is ready;
* ``bad_json``, ``bad_type``, ``unknown_field``, ``deep_json``, ``too_big`` -- malformed requests (must answer 4xx).

Prints a table per request kind (count, p50 / p99 latency, status codes), then the server's RSS after warm-up and at
the end, the state after the soak (/health in flight == 0, disconnects counted), and ends with one JSON line.
Exits 1 when any answer was unexpected (a 5xx, a malformed request not answered 4xx, a stream without [DONE]).

    python bench/bench_soak.py [--clients 8] [--seconds 30] [--max-tokens 16] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil

from rocket_deploy.report import format_table

HOST = "127.0.0.1"
CHAT = [{"role": "user", "content": "Tell me about lists and tuples."}]
KINDS = {"complete": 4, "chat": 3, "stream": 3, "drop_stream": 1, "drop_plain": 1, "bad_json": 1, "bad_type": 1,
         "unknown_field": 1, "deep_json": 1, "too_big": 1}
MALFORMED = ("bad_json", "bad_type", "unknown_field", "deep_json", "too_big")
BUSY = (429, 503)           # admission control under load: expected, counted, not failures

SERVER = """
import torch
torch.set_num_threads(1)
from rocket_deploy.runtime.server import ServerSettings, serve
from rocket_deploy.runtime.torch_backend import TorchEngine
from rocket_deploy.testing import tiny_llama, tiny_tokenizer
serve(TorchEngine(tiny_llama(), tiny_tokenizer(), device="cpu"), {host!r}, {port},
      ServerSettings(model_name="tiny", max_new_tokens={max_tokens}, max_concurrent=4, max_queue={queue},
                     max_body_bytes=65536, request_timeout_s=60), log_level="error")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def one(c: httpx.Client, kind: str, rng: random.Random, max_tokens: int) -> tuple[str, bool]:
    """Send one request of ``kind``; returns (outcome label, was it expected)."""
    gen = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 99)}
    json_hdr = {"content-type": "application/json"}
    if kind == "complete":
        r = c.post("/v1/completions", json={"prompt": rng.choice(["Sort the", "A list is", "def f("]), **gen})
        return str(r.status_code), r.status_code == 200 or r.status_code in BUSY
    if kind == "chat":
        r = c.post("/v1/chat/completions", json={"messages": CHAT, **gen})
        return str(r.status_code), r.status_code == 200 or r.status_code in BUSY
    if kind == "stream":
        with c.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "stream": True, **gen}) as s:
            if s.status_code != 200:
                s.read()
                return str(s.status_code), s.status_code in BUSY
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
            ok = bool(lines) and lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
            return "200" if ok else "200-broken", ok
    if kind == "drop_stream":
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": CHAT, "stream": True, "max_tokens": max_tokens, "temperature": 0}) as s:
            if s.status_code != 200:
                s.read()
                return str(s.status_code), s.status_code in BUSY
            for i, _ in enumerate(s.iter_lines()):
                if i >= 2:
                    break                   # leave mid-stream: the connection is closed
        return "dropped", True
    if kind == "drop_plain":
        try:
            r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0},
                       timeout=0.05)
            return str(r.status_code), r.status_code == 200 or r.status_code in BUSY
        except httpx.TimeoutException:
            return "dropped", True
    if kind == "bad_json":
        r = c.post("/v1/completions", content=b'{"prompt": "hi", ', headers=json_hdr)
    elif kind == "bad_type":
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": "ten"})
    elif kind == "unknown_field":
        r = c.post("/v1/chat/completions", json={"messages": CHAT, "response_format": {"type": "json_object"}})
    elif kind == "deep_json":
        r = c.post("/v1/completions", content=b"[" * 20000 + b"]" * 20000, headers=json_hdr)
    else:   # too_big
        r = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * 70000 + b'"}', headers=json_hdr)
    return str(r.status_code), 400 <= r.status_code < 500


def client_loop(url: str, seed: int, t_end: float, max_tokens: int, out: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < t_end:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            try:
                label, ok = one(c, kind, rng, max_tokens)
            except httpx.HTTPError as e:
                label, ok = type(e).__name__, False
            with lock:
                out.append((kind, label, ok, time.perf_counter() - t0))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first RSS reading")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or a.max_tokens < 1:
        ap.error("--clients, --seconds and --max-tokens must be positive")

    port = free_port()
    url = f"http://{HOST}:{port}"
    code = SERVER.format(host=HOST, port=port, max_tokens=a.max_tokens, queue=2 * a.clients)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t_end = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                print(proc.stdout.read().decode(), file=sys.stderr)
                return 2
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > t_end:
                print("the server did not come up in 120 s", file=sys.stderr)
                return 2
            time.sleep(0.2)
        server = psutil.Process(proc.pid)
        results: list = []
        lock = threading.Lock()
        t0 = time.monotonic()
        t_stop = t0 + a.warmup + a.seconds
        threads = [threading.Thread(target=client_loop, args=(url, a.seed * 1000 + i, t_stop, a.max_tokens,
                                                              results, lock), daemon=True)
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(a.warmup)
        rss_start = server.memory_info().rss
        rss_peak = rss_start
        while time.monotonic() < t_stop:
            time.sleep(0.5)
            rss_peak = max(rss_peak, server.memory_info().rss)
        for t in threads:
            t.join(timeout=90)
        wall = time.monotonic() - t0
        time.sleep(0.5)                     # let the last disconnects land
        rss_end = server.memory_info().rss
        health = httpx.get(url + "/health", timeout=5).json()
        metrics = httpx.get(url + "/metrics", timeout=5).text
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        exit_code = proc.wait(timeout=10)
        proc.stdout.close()

    by_kind: dict[str, list] = collections.defaultdict(list)
    for r in results:
        by_kind[r[0]].append(r)
    rows, codes_total = [], collections.Counter()
    for kind in KINDS:
        rs = by_kind.get(kind, [])
        codes = collections.Counter(r[1] for r in rs)
        codes_total.update(codes)
        lat = [r[3] * 1000 for r in rs if r[1] == "200"]
        answers = " ".join(f"{k}:{v}" for k, v in sorted(codes.items()))
        rows.append([kind, len(rs), pct(lat, 0.5), pct(lat, 0.99), answers, sum(not r[2] for r in rs)])
    ok_lat = [r[3] * 1000 for r in results if r[1] == "200"]
    unexpected = sum(not r[2] for r in results)
    disconnects = next((float(ln.split()[-1]) for ln in metrics.splitlines()
                        if ln.startswith("rocket_client_disconnects_total")), None)
    print(format_table(["kind", "n", "p50 ms (200)", "p99 ms (200)", "answers", "unexpected"], rows))
    print()
    summary = {"bench": "server_soak", "clients": a.clients, "seconds": a.seconds, "warmup_s": a.warmup,
               "max_tokens": a.max_tokens, "requests": len(results), "wall_s": round(wall, 1),
               "req_per_s": round(len(results) / wall, 1), "p50_ms": pct(ok_lat, 0.5), "p99_ms": pct(ok_lat, 0.99),
               "codes": dict(sorted(codes_total.items())), "unexpected": unexpected,
               "rss_start_mb": round(rss_start / 2**20, 1), "rss_peak_mb": round(rss_peak / 2**20, 1),
               "rss_end_mb": round(rss_end / 2**20, 1), "rss_growth_mb": round((rss_end - rss_start) / 2**20, 1),
               "in_flight_after": health["in_flight"], "waiting_after": health["waiting"],
               "server_disconnects_counted": disconnects, "server_exit_code": exit_code}
    for k in ("p50_ms", "p99_ms"):
        summary[k] = None if summary[k] is None else round(summary[k], 1)
    print(f"RSS: {summary['rss_start_mb']} MB after {a.warmup:g} s warm-up, {summary['rss_end_mb']} MB at the end "
          f"(peak {summary['rss_peak_mb']} MB, growth {summary['rss_growth_mb']} MB); after the soak: in flight "
          f"{health['in_flight']}, waiting {health['waiting']}; server exit code on SIGTERM {exit_code}")
    print(json.dumps(summary))
    bad = unexpected or health["in_flight"] or health["waiting"] or exit_code != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
