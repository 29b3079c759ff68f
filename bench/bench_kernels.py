"""Benchmark the rocket sparse V kernels on a GPU against cuBLAS and against copy bandwidth.

For SmolLM2-135M and Llama-3-8B layer shapes (q/o, k/v, gate/up, down) at a byte budget (fraction of the layer's
fp16 bytes REMOVED, as `compress --budget`) and keep ratios k/r of 1/2 and 1/3:

* decode, batch 1 / 4 / 16: the sparse V product alone (rate on the bytes it reads and writes, as % of the
  measured device-to-device copy bandwidth), and the whole compressed layer (x @ U by cuBLAS, then the kernel) vs
  cuBLAS on the dense fp16 weight, each both eager and replayed from a CUDA graph (no launch overhead);
* prefill, 512 / 2048 tokens: the compressed layer vs cuBLAS dense, and vs cuBLAS on the factorized weights
  (x @ U @ V_dense).

Times are CUDA-event medians over ``--repeats`` timings of ``--iters`` back-to-back calls. Prints tables and one JSON
line; ``run()`` returns the same dict (bench/gpu_check.py uses it). Without CUDA it exits with status 2.

    python bench/bench_kernels.py [--dtype fp16|bf16] [--budget 0.3] [--iters 50] [--models smollm2,llama8b]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

LAYER_SHAPES = {  # (d_in, d_out) per projection
    "smollm2": {"q_o": (576, 576), "k_v": (576, 192), "gate_up": (576, 1536), "down": (1536, 576)},
    "llama8b": {"q_o": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)},
}
KEEP_FRACS = (1 / 2, 1 / 3)
DECODE_BATCHES = (1, 4, 16)
PREFILL_TOKENS = (512, 2048)


def rank_keep_for_budget(d_in: int, d_out: int, budget: float, keep_frac: float) -> tuple[int, int]:
    """(r, k) whose fp16 bytes (U dense + V bitmask + packed values) are (1 - budget) x the dense fp16 weight."""
    target = (1.0 - budget) * d_in * d_out * 2
    per_rank = 2 * d_in + d_out * (1 / 8 + 2 * keep_frac)  # bytes(r) = 2 d_in r + d_out (r / 8 + 2 k_frac r)
    r = max(8, int(target / per_rank))
    return r, max(1, round(r * keep_frac))


def _median_ms(fn, iters: int, repeats: int, warmup: int = 5) -> float:
    """Median over `repeats` of (event time of `iters` back-to-back calls) / iters."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def _graph_ms(fn, iters: int, repeats: int) -> float | None:
    """Per-call time of `fn` replayed from a CUDA graph holding `iters` calls (None when capture fails)."""
    import torch
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()  # warm the caching allocator outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
    except Exception:  # noqa: BLE001 -- an op that cannot be captured: report no graph number
        return None
    return _median_ms(graph.replay, 1, repeats, warmup=2) / iters


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    """Device-to-device copy rate (read + write bytes per second) of one large buffer."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10, 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_packed(rank: int, keep: int, d_out: int, dtype, gen):
    import torch
    from rocket_deploy.sparse_format import pack_v, unpack_v
    v = torch.randn(rank, d_out, generator=gen)
    mask = torch.zeros(rank, d_out, dtype=torch.bool)
    mask.scatter_(0, torch.rand(rank, d_out, generator=gen).topk(keep, dim=0).indices, True)
    values, bits = pack_v(v, mask)
    dense_v = unpack_v(values, bits, rank)
    return values.to("cuda", dtype), bits.to("cuda"), dense_v.to("cuda", dtype)


def run(models=("smollm2", "llama8b"), dtype_name: str = "fp16", budget: float = 0.3, iters: int = 50,
        repeats: int = 5, batches=DECODE_BATCHES, tokens=PREFILL_TOKENS, keep_fracs=KEEP_FRACS,
        progress=None) -> dict:
    import torch
    from rocket_deploy.runtime import kernel_ext
    ext = kernel_ext.load_extension()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    esize = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    bw = copy_bandwidth_gbs()
    res = {"device": torch.cuda.get_device_name(), "dtype": dtype_name, "budget": budget, "iters": iters,
           "repeats": repeats, "copy_bandwidth_gbs": bw, "decode": [], "prefill": []}
    for model in models:
        for proj, (d_in, d_out) in LAYER_SHAPES[model].items():
            for frac in keep_fracs:
                rank, keep = rank_keep_for_budget(d_in, d_out, budget, frac)
                values, mask, dense_v = make_packed(rank, keep, d_out, dtype, gen)
                u = (torch.randn(d_in, rank, generator=gen) / math.sqrt(d_in)).to("cuda", dtype)
                w = (torch.randn(d_in, d_out, generator=gen) / math.sqrt(d_in)).to("cuda", dtype)
                base = {"model": model, "proj": proj, "d_in": d_in, "d_out": d_out, "rank": rank, "keep": keep,
                        "keep_frac": round(frac, 4)}
                layer_bytes = u.numel() * esize + mask.numel() + values.numel() * esize
                for b in batches:
                    x = torch.randn(b, d_in, device="cuda", dtype=dtype)
                    t = x @ u
                    moved = mask.numel() + values.numel() * esize + t.numel() * esize + b * d_out * esize
                    sv = _median_ms(lambda: ext.sparse_v_matmul(t, values, mask, rank), iters, repeats)
                    sv_g = _graph_ms(lambda: ext.sparse_v_matmul(t, values, mask, rank), iters, repeats)
                    layer = _median_ms(lambda: ext.sparse_v_matmul(x @ u, values, mask, rank), iters, repeats)
                    layer_g = _graph_ms(lambda: ext.sparse_v_matmul(x @ u, values, mask, rank), iters, repeats)
                    dense = _median_ms(lambda: x @ w, iters, repeats)
                    dense_g = _graph_ms(lambda: x @ w, iters, repeats)
                    best_sv = sv_g if sv_g is not None else sv
                    row = {**base, "batch": b, "sparse_v_bytes": moved, "sparse_v_ms": sv, "sparse_v_graph_ms": sv_g,
                           "sparse_v_gbs": moved / (best_sv * 1e-3) / 1e9,
                           "pct_copy_bw": 100 * moved / (best_sv * 1e-3) / 1e9 / bw,
                           "layer_bytes": layer_bytes, "dense_bytes": w.numel() * esize,
                           "layer_ms": layer, "layer_graph_ms": layer_g, "dense_ms": dense, "dense_graph_ms": dense_g,
                           "speedup_eager": dense / layer,
                           "speedup_graph": (dense_g / layer_g) if dense_g and layer_g else None}
                    res["decode"].append(row)
                for n in tokens:
                    x = torch.randn(n, d_in, device="cuda", dtype=dtype)
                    it = max(5, iters // 5)
                    ours = _median_ms(lambda: ext.sparse_v_matmul(x @ u, values, mask, rank), it, repeats)
                    dense = _median_ms(lambda: x @ w, it, repeats)
                    fact = _median_ms(lambda: (x @ u) @ dense_v, it, repeats)
                    res["prefill"].append({**base, "tokens": n, "layer_ms": ours, "dense_ms": dense,
                                           "factorized_ms": fact, "speedup_vs_dense": dense / ours,
                                           "speedup_vs_factorized": fact / ours})
                if progress:
                    progress(f"{model} {proj} k/r {frac:.2f}")
                del values, mask, dense_v, u, w
    return res


def tables(res: dict) -> tuple[list[str], list[list], list[str], list[list]]:
    """(headers, rows) of the decode and the prefill table."""
    dh = ["model", "proj", "r", "k", "batch", "V us", "V graph us", "% copy bw", "layer us", "dense us",
          "x eager", "layer graph us", "dense graph us", "x graph"]
    drows = [[r["model"], r["proj"], r["rank"], r["keep"], r["batch"], r["sparse_v_ms"] * 1e3,
              None if r["sparse_v_graph_ms"] is None else r["sparse_v_graph_ms"] * 1e3, r["pct_copy_bw"],
              r["layer_ms"] * 1e3, r["dense_ms"] * 1e3, r["speedup_eager"],
              None if r["layer_graph_ms"] is None else r["layer_graph_ms"] * 1e3,
              None if r["dense_graph_ms"] is None else r["dense_graph_ms"] * 1e3, r["speedup_graph"]]
             for r in res["decode"]]
    ph = ["model", "proj", "r", "k", "tokens", "layer us", "dense us", "x@U@Vd us", "x dense", "x factorized"]
    prows = [[r["model"], r["proj"], r["rank"], r["keep"], r["tokens"], r["layer_ms"] * 1e3, r["dense_ms"] * 1e3,
              r["factorized_ms"] * 1e3, r["speedup_vs_dense"], r["speedup_vs_factorized"]] for r in res["prefill"]]
    return dh, drows, ph, prows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--budget", type=float, default=0.3, help="fraction of each layer's fp16 bytes removed")
    ap.add_argument("--iters", type=int, default=50, help="back-to-back calls per timing")
    ap.add_argument("--repeats", type=int, default=5, help="timings per number (median)")
    ap.add_argument("--models", default="smollm2,llama8b", help="comma-separated: smollm2, llama8b")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in LAYER_SHAPES]
    if unknown or not 0 < args.budget < 1 or args.iters < 1 or args.repeats < 1:
        print(f"bench_kernels: bad arguments (models {unknown or models}, budget {args.budget} in (0, 1), iters / "
              f"repeats >= 1); models are {', '.join(LAYER_SHAPES)}", file=sys.stderr)
        return 2
    import torch
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU and a CUDA build of torch "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}); nothing measured", file=sys.stderr)
        return 2
    from rocket_deploy.report import format_table
    res = run(models, args.dtype, args.budget, args.iters, args.repeats,
              progress=lambda m: print(f"# {m}", file=sys.stderr))
    dh, drows, ph, prows = tables(res)
    print(f"# {res['device']}, {args.dtype}, budget {args.budget}, copy bandwidth {res['copy_bandwidth_gbs']:.0f} GB/s")
    print(format_table(dh, drows))
    print()
    print(format_table(ph, prows))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
