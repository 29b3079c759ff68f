"""Perplexity against bytes: dense fp16 / int8 / fp8 / int4, ROCKET, and ROCKET + each quantization.

Profiles once per quantization setting (the knapsack sees quantized sizes and errors, so every setting has its own
profile), compresses at the given budgets (fraction of the targeted layers' fp16 bytes removed), and measures
held-out perplexity. Bytes are those of the targeted layers (attention + MLP projections), scales included.
Prints a table, writes a Pareto plot (perplexity against bytes) and ends with one JSON line.

    python bench/bench_quantization.py --plot docs/img/quantization-pareto.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], float("inf")
    for b, p in sorted(points):
        if p < best:
            front.append((b, p))
            best = p
    return front


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sources", default="stdlib", help="calibration sources, comma-separated")
    ap.add_argument("--domain", default=None, help="evaluation domain (default: the first source)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--budgets", default="0.2,0.3,0.4,0.5", help="ROCKET (fp16 factors) budgets")
    ap.add_argument("--int8-budgets", default="0.5,0.6,0.7")
    ap.add_argument("--fp8-budgets", default="0.5,0.6")
    ap.add_argument("--int4-budgets", default="0.72,0.76,0.8")
    ap.add_argument("--schemes", default="int8,fp8,int4")
    ap.add_argument("--profile-root", default=None, help="keep profiles here (reused when present)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
    from rocket_deploy.compress.profile import Profile
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.evaluation import heldout_split
    from rocket_deploy.models import load_model
    from rocket_deploy.perplexity import perplexity

    t0 = time.perf_counter()
    lm = load_model(args.model)
    cal = CalibrationConfig(sources=tuple(args.sources.split(",")), samples=args.calib_samples,
                            seq_len=args.seq_len, eval_samples=args.eval_samples)
    data = prepare_calibration(lm.tokenizer, cal, lm.model)
    domain = args.domain or cal.sources[0]
    split = heldout_split(lm.tokenizer, cal, domain, model=lm.model)
    dense_ppl = perplexity(lm.model, split.ids)
    rows = [{"label": "dense fp16", "family": "dense", "quantize": None, "budget": None, "bytes_ratio": 1.0,
             "ppl": dense_ppl, "seconds": 0.0}]
    print(f"dense fp16: ppl {dense_ppl:.3f}", flush=True)
    timings = {"profile_s": {}}
    schemes = [None] + [s for s in args.schemes.split(",") if s]
    budgets = {None: args.budgets, "int8": args.int8_budgets, "fp8": args.fp8_budgets, "int4": args.int4_budgets}
    dense_bytes = None
    for q in schemes:
        cache = os.path.join(args.profile_root, f"profile-{q or 'fp16'}") if args.profile_root else None
        t = time.perf_counter()
        if cache and os.path.isfile(os.path.join(cache, "profile.json")):
            prof = Profile.load(cache)
            assert prof.grid.get("quantize") == q and prof.calibration.get("calib_sha256_16") == data.info["calib_sha256_16"]
        else:
            prof = run_profile(lm.model, lm.tokenizer, RocketConfig(quantize=q), cal, data=data, cache_dir=cache,
                               progress=False)
        timings["profile_s"][q or "fp16"] = round(time.perf_counter() - t, 1)
        print(f"profile {q or 'fp16'}: {timings['profile_s'][q or 'fp16']} s", flush=True)
        runs = [("dense-quant", 0.5)] if q else []
        runs += [("rocket", float(b)) for b in budgets[q].split(",") if b]
        for method, b in runs:
            cfg = RocketConfig(budget=b, method=method, quantize=q, safeguard=False)
            t = time.perf_counter()
            res = compress(lm.model, lm.tokenizer, cfg, cal, data=data, profile=prof, progress=False)
            ppl = perplexity(res.model, split.ids)
            bm = res.manifest["budget"]
            dense_bytes = bm["dense_bytes"]
            label = f"dense {q}" if method == "dense-quant" else (f"ROCKET+{q} @{b}" if q else f"ROCKET @{b}")
            rows.append({"label": label, "family": "dense" if method == "dense-quant" else f"rocket{'+' + q if q else ''}",
                         "quantize": q, "budget": None if method == "dense-quant" else b,
                         "bytes_ratio": bm["bytes_ratio"], "compressed_bytes": bm["compressed_bytes"],
                         "layers_dense": bm["layers_dense"], "ppl": ppl,
                         "predicted_error": res.manifest["allocation"].get("predicted_error"),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"{label:22s} bytes {bm['bytes_ratio']:.4f}  dense layers {bm['layers_dense']:3d}  ppl {ppl:.3f}  "
                  f"({rows[-1]['seconds']} s)", flush=True)
            del res
        if not args.profile_root:
            import shutil
            shutil.rmtree(prof.cache_dir, ignore_errors=True)
        del prof
    front = pareto_front([(r["bytes_ratio"], r["ppl"]) for r in rows])
    on_front = set(front)
    print()
    print("| configuration | bytes (x dense fp16) | MB | perplexity | x dense | Pareto |")
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["bytes_ratio"]):
        mb = r["bytes_ratio"] * dense_bytes / 1e6 if dense_bytes else float("nan")
        print(f"| {r['label']} | {r['bytes_ratio']:.3f} | {mb:.1f} | {r['ppl']:.3f} | {r['ppl'] / dense_ppl:.3f} | "
              f"{'yes' if (r['bytes_ratio'], r['ppl']) in on_front else ''} |")
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"timings: {timings}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        fams = list(dict.fromkeys(r["family"] for r in rows))
        for fam in fams:
            pts = sorted((r["bytes_ratio"], r["ppl"]) for r in rows if r["family"] == fam)
            ax.plot(*zip(*pts), "o-" if fam != "dense" else "s", label=fam if fam != "dense" else "dense (fp16/int8/fp8/int4)")
        for r in rows:
            if r["family"] == "dense":
                ax.annotate(r["label"].split()[-1], (r["bytes_ratio"], r["ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
        ax.set_yscale("log")
        ax.set_xlabel("bytes of the targeted layers (fraction of dense fp16)")
        ax.set_ylabel(f"perplexity ({domain}, held out)")
        ax.set_title(f"{args.model}: perplexity vs bytes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    print(json.dumps({"model": args.model, "calibration": cal.to_dict(), "domain": domain, "dense_ppl": dense_ppl,
                      "dense_bytes": dense_bytes, "rows": rows, "pareto": front, "timings_s": timings}, default=float))


if __name__ == "__main__":
    sys.exit(main())
