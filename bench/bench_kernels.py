"""Benchmark the rocket sparse V kernels on a GPU (CUDA events, warm-up, median of many runs).

1. Decode (1 row): the sparse V product vs a device-to-device copy of the same bytes (mask + values + t + y);
   reported as % of the copy bandwidth.
2. A whole compressed layer at budget 0.3 (x @ U by torch, then the sparse V kernel) vs torch.matmul on the original
   dense weight (cuBLAS), for SmolLM2-135M shapes and a few larger ones, at 1 row.
3. Prefill (512 / 4096 rows): the compressed layer vs cuBLAS on the dense factorized weights (x @ U @ V_dense).

Prints a table and ends with one JSON line. Without CUDA it exits with status 2 and says so.

    python bench/bench_kernels.py [--dtype fp16|bf16|fp32] [--iters 200] [--budget 0.3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

SHAPES_SMALL = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # SmolLM2-135M: q/o, k/v, gate/up, down
SHAPES_LARGE = [(4096, 4096), (4096, 14336)]


def rank_keep_for_budget(d_in: int, d_out: int, budget: float, keep_frac: float = 0.5) -> tuple[int, int]:
    """(r, k) whose fp16 bytes (U dense + V bitmask + packed values) are ~budget x the dense fp16 weight."""
    target = budget * d_in * d_out * 2
    # bytes(r) = 2*d_in*r + d_out*(ceil(r/8) + 2*keep_frac*r)
    per_rank = 2 * d_in + d_out * (1 / 8 + 2 * keep_frac)
    r = max(8, int(target / per_rank))
    return r, max(1, round(r * keep_frac))


def time_ms(fn, iters: int, warmup: int = 20) -> float:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_packed(rank, keep, d_out, dtype, device):
    import torch
    from rocket_deploy.sparse_format import pack_v, unpack_v
    v = torch.randn(rank, d_out)
    mask = torch.zeros(rank, d_out, dtype=torch.bool)
    mask.scatter_(0, torch.rand(rank, d_out).topk(keep, dim=0).indices, True)
    values, bits = pack_v(v, mask)
    dense_v = unpack_v(values, bits, rank)
    return values.to(device, dtype), bits.to(device), dense_v.to(device, dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--keep-frac", type=float, default=0.5, help="k / r of the sparse V (default 0.5)")
    ap.add_argument("--no-large", action="store_true", help="skip the 4096-wide shapes")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU and a CUDA build of torch "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}); nothing measured", file=sys.stderr)
        return 2
    from rocket_deploy.runtime import kernel_ext
    ext = kernel_ext.load_extension()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "budget": args.budget,
               "keep_frac": args.keep_frac, "decode": [], "layer_1row": [], "prefill": []}
    shapes = SHAPES_SMALL + ([] if args.no_large else SHAPES_LARGE)

    # ---- 1 + 2: decode --------------------------------------------------------------------------------------------
    print(f"# {results['device']}, {args.dtype}, budget {args.budget}, k/r {args.keep_frac}, median of {args.iters}")
    print(f"{'d_in x d_out':>14} {'r':>5} {'k':>5} | {'V bytes':>9} {'sparseV us':>10} {'copy us':>8} "
          f"{'% copy bw':>9} | {'layer us':>8} {'dense us':>8} {'speedup':>7}")
    for d_in, d_out in shapes:
        rank, keep = rank_keep_for_budget(d_in, d_out, args.budget, args.keep_frac)
        values, mask, dense_v = make_packed(rank, keep, d_out, dtype, dev)
        u = torch.randn(d_in, rank, device=dev, dtype=dtype) / d_in ** 0.5
        w = torch.randn(d_in, d_out, device=dev, dtype=dtype) / d_in ** 0.5
        x = torch.randn(1, d_in, device=dev, dtype=dtype)
        t = x @ u
        moved = mask.numel() + values.numel() * esize + t.numel() * esize + d_out * esize
        src = torch.empty(moved, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        sv = time_ms(lambda: ext.sparse_v_matmul(t, values, mask, rank), args.iters)
        cp = time_ms(lambda: dst.copy_(src), args.iters)
        layer = time_ms(lambda: ext.sparse_v_matmul(x @ u, values, mask, rank), args.iters)
        dense = time_ms(lambda: torch.matmul(x, w), args.iters)
        pct = 100.0 * cp / sv
        print(f"{d_in:>6} x {d_out:<6} {rank:>5} {keep:>5} | {moved:>9} {sv * 1e3:>10.1f} {cp * 1e3:>8.1f} "
              f"{pct:>8.0f}% | {layer * 1e3:>8.1f} {dense * 1e3:>8.1f} {dense / layer:>6.2f}x")
        results["decode"].append({"d_in": d_in, "d_out": d_out, "rank": rank, "keep": keep, "bytes": moved,
                                  "sparse_v_ms": sv, "copy_ms": cp, "pct_copy_bw": pct})
        results["layer_1row"].append({"d_in": d_in, "d_out": d_out, "layer_ms": layer, "dense_cublas_ms": dense,
                                      "speedup": dense / layer})

    # ---- 3: prefill -------------------------------------------------------------------------------------------------
    print(f"\n{'d_in x d_out':>14} {'rows':>5} | {'rocket us':>9} {'x@U@Vd us':>9} {'ratio':>6}")
    for d_in, d_out in shapes:
        rank, keep = rank_keep_for_budget(d_in, d_out, args.budget, args.keep_frac)
        values, mask, dense_v = make_packed(rank, keep, d_out, dtype, dev)
        u = torch.randn(d_in, rank, device=dev, dtype=dtype) / d_in ** 0.5
        for rows in (512, 4096):
            x = torch.randn(rows, d_in, device=dev, dtype=dtype)
            ours = time_ms(lambda: ext.sparse_v_matmul(x @ u, values, mask, rank), max(20, args.iters // 4))
            ref = time_ms(lambda: (x @ u) @ dense_v, max(20, args.iters // 4))
            print(f"{d_in:>6} x {d_out:<6} {rows:>5} | {ours * 1e3:>9.1f} {ref * 1e3:>9.1f} {ref / ours:>5.2f}x")
            results["prefill"].append({"d_in": d_in, "d_out": d_out, "rows": rows, "rocket_ms": ours,
                                       "cublas_factorized_ms": ref, "speed_ratio": ref / ours})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
