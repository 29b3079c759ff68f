"""Scale bench (issue 14 section 2): profile random-weight Llama blocks with the exact geometry of Llama-3.2-1B and
Llama-3-8B on CPU with the real profiling code, and extrapolate to the whole model.

Each geometry runs in its own subprocess (its own peak RSS): a ``LlamaForCausalLM`` built from a ``LlamaConfig``
(random weights, float32 as ``load_model`` loads on CPU, nothing downloaded) with ``--blocks`` decoder blocks,
profiled by :func:`rocket_deploy.compress.profile.profile_model` on random token ids (``--samples x --seq-len``).
No output-sensitivity backward pass (the ``fisher`` objective's): that one runs once through the whole model.

``--grid reduced`` profiles only the byte fraction 0.5 (x the 4 default keep ratios) and extrapolates the
candidate-loop time to the default grid (8 fractions x 4 keep ratios): per layer, seconds per unit of rank of
the measured dense (keep = rank) and sparse candidates times the summed ranks of the default grid's ones.
Everything else (forward + Grams, whitening, eigenbasis, writing the cache) is measured as is.

    flock /tmp/heavy.lock env OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \\
        .venv/bin/python bench/bench_scale.py --models llama-3.2-1b,llama-3-8b --blocks 1 --grid reduced

Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

# the exact geometries (config.json of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B)
GEOMETRIES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, num_hidden_layers=16, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, vocab_size=128256, num_hidden_layers=32, tie_word_embeddings=False),
    "smoke": dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,   # checks the bench
                  head_dim=64, vocab_size=1024, num_hidden_layers=4, tie_word_embeddings=True),
}
STAGES = ("capture", "forward_gram", "whiten", "eigenbasis", "candidates", "save")
GiB = 2 ** 30


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB     # ru_maxrss is KiB on Linux


def _param_count(g: dict, blocks: int) -> int:
    h, i, v = g["hidden_size"], g["intermediate_size"], g["vocab_size"]
    kv = g["num_key_value_heads"] * g["head_dim"]
    q = g["num_attention_heads"] * g["head_dim"]
    block = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return blocks * block + v * h * (1 if g["tie_word_embeddings"] else 2) + h


def run_one(name: str, blocks: int, samples: int, seq_len: int, grid: str, work_dir: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rocket_deploy.compress import profile as prof_mod
    from rocket_deploy.compress.candidates import candidate_grid
    from rocket_deploy.config import RocketConfig
    from rocket_deploy.targets import select_targets

    full = GEOMETRIES[name]
    g = dict(full, num_hidden_layers=blocks, tie_word_embeddings=True)    # lm_head is never run by the profile
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(**g)).eval()
    build_s = time.perf_counter() - t0
    rss_weights = _rss_gib()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB

    default = RocketConfig()
    config = RocketConfig(byte_fractions=(0.5,)) if grid == "reduced" else default
    targets = select_targets(model, config.targets, config.exclude)
    ids = torch.randint(0, g["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(0))

    spent = {k: 0.0 for k in STAGES}
    cpu = {k: 0.0 for k in STAGES}      # process CPU seconds (all threads): less sensitive to a loaded machine
    cand_times: dict[tuple[int, int], list[tuple[int, int, float]]] = {}
    orig = {k: getattr(prof_mod, k) for k in ("capture_block_inputs", "whitening_factor", "inverse_upper",
                                             "eigenbasis", "factorize", "save_file")}

    def timed(stage, fn, record=False):
        def wrapper(*a, **kw):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            dt = time.perf_counter() - t
            spent[stage] += dt
            cpu[stage] += time.process_time() - c
            if record:      # factorize(eb, rank, keep, ...)
                eb, rank, keep = a[0], a[1], a[2]
                cand_times.setdefault(tuple(eb.w.shape), []).append((rank, keep, dt))
            return out
        return wrapper

    prof_mod.capture_block_inputs = timed("capture", orig["capture_block_inputs"])
    prof_mod.whitening_factor = timed("whiten", orig["whitening_factor"])
    prof_mod.inverse_upper = timed("whiten", orig["inverse_upper"])
    prof_mod.eigenbasis = timed("eigenbasis", orig["eigenbasis"])
    prof_mod.factorize = timed("candidates", orig["factorize"], record=True)
    prof_mod.save_file = timed("save", orig["save_file"])
    cache = os.path.join(work_dir, f"{name}-prof")
    shutil.rmtree(cache, ignore_errors=True)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        def progress(block, n_blocks, layer, n_candidates):     # partial results survive a timeout
            print(json.dumps({"layer": layer, "elapsed_s": round(time.perf_counter() - t0, 1),
                              "rss_gib": round(_rss_gib(), 2), **{k: round(v, 1) for k, v in spent.items()}}),
                  file=sys.stderr, flush=True)
        prof_mod.profile_model(model, targets, ids, config, cache, batch_size=8, progress=progress)
        total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for k, v in orig.items():
            setattr(prof_mod, k, v)
    rss_peak = _rss_gib()
    disk = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
    shutil.rmtree(cache, ignore_errors=True)
    # eigenbasis() runs inside profile_layer, factorize() too: profile_layer's own time is neither
    spent["forward_gram"] = total - sum(spent[k] for k in STAGES if k != "forward_gram")
    cpu["forward_gram"] = cpu_total - sum(cpu[k] for k in STAGES if k != "forward_gram")

    # candidate loop on the default grid: seconds per unit of rank (dense and sparse apart) x the grid's ranks
    cand_full = 0.0
    for (d_in, d_out), meas in cand_times.items():
        per_layer = sum(1 for n in targets if tuple(targets[n].weight.shape[::-1]) == (d_in, d_out))
        rate = {}
        for dense in (True, False):
            pts = [(r, t) for r, k, t in meas if (k == r) == dense]
            if pts:
                rate[dense] = sum(t for _, t in pts) / sum(r for r, _ in pts)
        cands = candidate_grid(d_in, d_out, default.byte_fractions, default.keep_ratios, default.rank_multiple)
        est = sum(c.rank * rate.get(c.keep == c.rank, rate.get(not (c.keep == c.rank), 0.0)) for c in cands)
        cand_full += est * per_layer
    per_block = {k: v / blocks for k, v in spent.items()}
    per_block_default_grid = dict(per_block, candidates=cand_full / blocks)
    n_full = full["num_hidden_layers"]
    full_params = _param_count(full, n_full)
    tokens_default = 64 * 256                      # CalibrationConfig(): samples 64 x seq_len 256
    hidden_gib = 2 * tokens_default * full["hidden_size"] * 4 / GiB    # fp32 hidden states in + out of a block
    hidden_meas = 2 * samples * seq_len * full["hidden_size"] * 4 / GiB
    state_gib = rss_peak - weights_gib             # one block's profiling state (+ interpreter, libraries)
    return {
        "model": name, "blocks": blocks, "tokens": samples * seq_len, "grid": grid,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "build_s": round(build_s, 1), "profile_s": round(total, 1),
        "seconds_per_block": {k: round(v, 1) for k, v in per_block.items()},
        "cpu_seconds_per_block": {k: round(v / blocks, 1) for k, v in cpu.items()},
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "seconds_per_block_measured": round(sum(per_block.values()), 1),
        "seconds_per_block_default_grid": round(sum(per_block_default_grid.values()), 1),
        "candidates_per_block_default_grid": round(cand_full / blocks, 1),
        "weights_gib": round(weights_gib, 2), "rss_after_build_gib": round(rss_weights, 2),
        "peak_rss_gib": round(rss_peak, 2), "block_state_gib": round(state_gib, 2),
        "disk_per_block_gib": round(disk / blocks / GiB, 3),
        "full_model": {
            "blocks": n_full, "params_b": round(full_params / 1e9, 2),
            "weights_fp32_gib": round(full_params * 4 / GiB, 1), "weights_bf16_gib": round(full_params * 2 / GiB, 1),
            "peak_rss_fp32_gib": round(full_params * 4 / GiB + state_gib - hidden_meas + hidden_gib, 1),
            "disk_gib": round(disk / blocks / GiB * n_full, 1),
            "hours_default_grid": round(sum(per_block_default_grid.values()) * n_full / 3600, 2),
        },
    }


def eigh_compare(shapes: list[tuple[int, int]], reps: int = 2) -> list[dict]:
    """Seconds of :func:`eigenbasis` on the d_in side vs the default (smaller side) for random ``W`` and ``S``."""
    import torch

    from rocket_deploy.compress.factorize import eigenbasis
    from rocket_deploy.compress.whitening import inverse_upper, whitening_factor
    out = []
    for d_in, d_out in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2 * d_in, d_in, generator=g, dtype=torch.float64) * torch.rand(d_in, generator=g, dtype=torch.float64)
        s, _ = whitening_factor(x.t() @ x / x.shape[0])
        s_inv = inverse_upper(s)
        w = torch.randn(d_in, d_out, generator=g) * 0.02
        row = {"shape": f"{d_in}x{d_out}"}
        for side in ("in", "auto"):
            ts, cs = [], []
            for _ in range(reps):
                t, c = time.perf_counter(), time.process_time()
                eb = eigenbasis(w, s, s_inv, side=side)
                ts.append(time.perf_counter() - t)
                cs.append(time.process_time() - c)
            row[f"{side}_s"], row[f"{side}_cpu_s"] = round(min(ts), 3), round(min(cs), 3)
            row[f"{side}_eigvals"] = eb.eigvals
        row["max_rel_eigval_diff"] = float((row.pop("in_eigvals") - row.pop("auto_eigvals")).abs().max()
                                           / max(float(eb.eigvals[0]), 1e-30))
        out.append(row)
    return out


def _table(rows: list[dict]) -> str:
    out = ["| model | blocks run | tokens | s/block measured (grid) | fwd+Gram+rest | whiten | eigenbasis | candidates | "
           "save | s/block default grid* | peak RSS | block state | disk/block | whole model*: h, disk, RSS fp32 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, f = r["seconds_per_block"], r["full_model"]
        out.append(f"| {r['model']} | {r['blocks']} | {r['tokens']} | {r['seconds_per_block_measured']} ({r['grid']}) | "
                   f"{s['forward_gram'] + s['capture']:.1f} | {s['whiten']} | {s['eigenbasis']} | {s['candidates']} | "
                   f"{s['save']} | {r['seconds_per_block_default_grid']} | {r['peak_rss_gib']} GiB | "
                   f"{r['block_state_gib']} GiB | {r['disk_per_block_gib']} GiB | "
                   f"{f['hours_default_grid']} h x{f['blocks']}, {f['disk_gib']} GiB, {f['peak_rss_fp32_gib']} GiB |")
    out.append("* extrapolated: candidates to the default grid (reduced grid only), x blocks for the whole model; "
               "RSS = full fp32 weights + measured block state (hidden states rescaled to 64 x 256 tokens).")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.2-1b,llama-3-8b", help=f"comma list of {sorted(GEOMETRIES)}")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--grid", choices=("reduced", "default"), default="reduced")
    ap.add_argument("--work-dir", default=os.environ.get("TMPDIR", "/tmp"), help="profile cache (deleted after)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--eigh-shapes", default=None,
                    help="only time eigenbasis() d_in side vs default on these d_in x d_out, e.g. 1536x576,4096x1024")
    a = ap.parse_args(argv)
    if a.eigh_shapes:
        rows = eigh_compare([tuple(int(v) for v in sh.split("x")) for sh in a.eigh_shapes.split(",")])
        for r in rows:
            print(f"| {r['shape']} | {r['in_s']} ({r['in_cpu_s']} CPU) | {r['auto_s']} ({r['auto_cpu_s']} CPU) | "
                  f"{r['in_s'] / max(r['auto_s'], 1e-9):.1f}x | {r['max_rel_eigval_diff']:.1e} |")
        print(json.dumps({"bench": "scale-eigh", "rows": rows}))
        return
    if a.one:
        print(json.dumps(run_one(a.one, a.blocks, a.samples, a.seq_len, a.grid, a.work_dir)))
        return
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    bad = [n for n in names if n not in GEOMETRIES]
    if bad:
        ap.error(f"unknown model {bad[0]!r}: choose from {', '.join(GEOMETRIES)}")
    rows = []
    for n in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", n, "--blocks", str(a.blocks), "--samples",
               str(a.samples), "--seq-len", str(a.seq_len), "--grid", a.grid, "--work-dir", a.work_dir]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)      # its per-layer progress goes to stderr
        if p.returncode != 0:
            raise SystemExit(f"{n}: the profiling subprocess failed (exit {p.returncode})")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(_table(rows))
    print(json.dumps({"bench": "scale", "rows": rows}))


if __name__ == "__main__":
    main()
