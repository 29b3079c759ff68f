"""Compression quality and cost on the embedded SmolLM2-135M (or any model).

Profiles ONCE, then for every budget compresses with ROCKET (one row per allocation objective),
ROCKET-uniform and SVD-LLM at equal bytes, and measures held-out perplexity per text domain side by side with
the dense model, plus wall time of each stage. Prints a table and ends with one JSON line.

    python bench/bench_compression.py                                   # issue-3 sweep, stdlib docstrings
    python bench/bench_compression.py --sources stdlib,pyref,licenses,selfgen \
        --domains stdlib,pyref,licenses,pkgdocs,selfgen --objectives rel-original,rel-whitened,whitened-energy,fisher
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--sources", default="stdlib", help="calibration sources, comma-separated")
    ap.add_argument("--domains", default=None, help="evaluation domains (default: the calibration sources)")
    ap.add_argument("--objectives", default="auto")
    ap.add_argument("--methods", default="rocket,rocket-uniform,svd-llm")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--gram-damping", type=float, default=None, help="RocketConfig.gram_damping (default: the config's)")
    ap.add_argument("--safeguard", action="store_true", help="let ROCKET fall back to uniform when better")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--plot", default=None, help="PNG of perplexity against budget")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.evaluation import heldout_split
    from rocket_deploy.models import load_model
    from rocket_deploy.perplexity import perplexity

    timings = {}
    t = time.perf_counter()
    lm = load_model(args.model)
    timings["load_s"] = time.perf_counter() - t
    cal = CalibrationConfig(sources=tuple(args.sources.split(",")), samples=args.calib_samples,
                            seq_len=args.seq_len, eval_samples=args.eval_samples)
    t = time.perf_counter()
    data = prepare_calibration(lm.tokenizer, cal, lm.model)
    timings["calibration_text_s"] = time.perf_counter() - t
    domains = (args.domains or args.sources).split(",")
    splits = {d: heldout_split(lm.tokenizer, cal, d, model=lm.model) for d in domains}
    t = time.perf_counter()
    dense_ppl = {d: perplexity(lm.model, sp.ids) for d, sp in splits.items()}
    timings["eval_dense_s"] = time.perf_counter() - t
    budgets = [float(b) for b in args.budgets.split(",")]
    objectives = args.objectives.split(",")
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        base = RocketConfig() if args.gram_damping is None else RocketConfig(gram_damping=args.gram_damping)
        prof = run_profile(lm.model, lm.tokenizer, base, cal, data=data, cache_dir=cache, progress=False)
        timings["profile_s"] = time.perf_counter() - t
        rows = []
        for b in budgets:
            runs = []
            for m in args.methods.split(","):
                for obj in (objectives if m == "rocket" else [objectives[0]]):
                    runs.append((m, obj))
            for method, obj in runs:
                cfg = base.replace(budget=b, method=method, objective=obj, safeguard=args.safeguard)
                t = time.perf_counter()
                res = compress(lm.model, lm.tokenizer, cfg, cal, data=data, profile=prof, progress=False)
                tc = time.perf_counter() - t
                t = time.perf_counter()
                ppl = {d: perplexity(res.model, sp.ids) for d, sp in splits.items()}
                te = time.perf_counter() - t
                label = method if method != "rocket" else f"rocket[{obj}]"
                guard = res.manifest["allocation"].get("safeguard", {}).get("chosen")
                rows.append({"budget": b, "method": label, "removed": res.manifest["budget"]["removed_bytes_fraction"],
                             "ppl": ppl, "compress_s": tc, "eval_s": te, "safeguard": guard})
                print(f"budget {b} {label:28s} removed {rows[-1]['removed']:.4f} " +
                      " ".join(f"{d}={v:.2f}({v / dense_ppl[d]:.2f}x)" for d, v in ppl.items()) +
                      f"  compress {tc:.1f}s eval {te:.1f}s" + (f" safeguard->{guard}" if guard else ""), flush=True)
                del res
    print()
    head = ["budget", "method", "removed"] + [f"{d} ppl (x dense)" for d in domains]
    print(" | ".join(head))
    print(" | ".join(["dense", "-", "0"] + [f"{dense_ppl[d]:.2f}" for d in domains]))
    for r in rows:
        print(" | ".join([str(r["budget"]), r["method"], f"{r['removed']:.3f}"] +
                         [f"{r['ppl'][d]:.2f} ({r['ppl'][d] / dense_ppl[d]:.2f}x)" for d in domains]))
    print("timings: " + ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), squeeze=False)
        for ax, d in zip(axes[0], domains):
            for label in dict.fromkeys(r["method"] for r in rows):
                pts = [(r["budget"], r["ppl"][d]) for r in rows if r["method"] == label]
                ax.plot(*zip(*pts), "o-", label=label)
            ax.axhline(dense_ppl[d], color="k", ls="--", lw=0.8, label="dense")
            ax.set_yscale("log"); ax.set_xlabel("budget (fraction of targeted bytes removed)"); ax.set_title(d)
        axes[0][0].set_ylabel("perplexity"); axes[0][0].legend(fontsize=7)
        fig.tight_layout(); fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")
    print(json.dumps({"model": args.model, "calibration": cal.to_dict(), "dense_ppl": dense_ppl, "rows": rows,
                      "timings_s": timings}, default=float))


if __name__ == "__main__":
    sys.exit(main())
