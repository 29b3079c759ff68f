"""Factorization levers (issue 11): each lever on and off at one budget, from one fp16 profile, per domain.

Perplexity (x dense) on the held-out documents of the calibration sources and on never-calibrated registers,
plus the materialise wall time and the summed whitened error of the compressed layers. Safeguard off (the
allocation is the same knapsack choice for every row; only how the chosen layers are fitted changes).

    python bench/bench_levers.py --profile-dir /tmp/h4b/prof-fp16 --budget 0.3 \
        --levers base,refit1,refit2,refit4,prop,prop+refit2
"""
from __future__ import annotations

import argparse
import json
import time

import torch

LEVERS = {"base": {"refit_rounds": 0}, "refit1": {"refit_rounds": 1}, "refit2": {"refit_rounds": 2}, "refit4": {"refit_rounds": 4},
          "prop": {"error_propagation": True, "refit_rounds": 0}, "prop+refit2": {"error_propagation": True, "refit_rounds": 2}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--levers", default="base,refit2,prop,prop+refit2")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--domains", default="stdlib,pyref,licenses,selfgen,pkgdocs,never-calibrated")
    ap.add_argument("--profile-dir", default=None, help="reused when it matches (profile once)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rocket_deploy.compress.pipeline import compress, load_or_profile, prepare_calibration
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.evaluation import expand_domains, heldout_split
    from rocket_deploy.models import load_model
    from rocket_deploy.perplexity import perplexity

    lm = load_model(args.model)
    cal = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    data = prepare_calibration(lm.tokenizer, cal, lm.model)
    t = time.perf_counter()
    prof = load_or_profile(lm.model, lm.tokenizer, RocketConfig(), cal, data, args.profile_dir, progress=False, log=print)
    print(f"profile {time.perf_counter() - t:.1f}s (recorded {prof.seconds:.1f}s)", flush=True)
    domains = expand_domains(args.domains.split(","), cal)
    splits = {d: heldout_split(lm.tokenizer, cal, d, model=lm.model) for d in domains}
    dense = {d: perplexity(lm.model, sp.ids) for d, sp in splits.items()}
    print("dense " + " ".join(f"{d}={v:.2f}" for d, v in dense.items()), flush=True)
    rows = []
    for name in args.levers.split(","):
        cfg = RocketConfig(budget=args.budget, safeguard=False, **LEVERS[name])
        t = time.perf_counter()
        res = compress(lm.model, lm.tokenizer, cfg, cal, data=data, profile=prof, progress=False)
        tc = time.perf_counter() - t
        ppl = {d: perplexity(res.model, sp.ids) for d, sp in splits.items()}
        wsq = sum(r["whitened_sq"] for r in res.manifest["layers"].values())
        row = {"lever": name, "fields": LEVERS[name], "compress_s": round(tc, 1), "whitened_sq": wsq,
               "removed": res.manifest["budget"]["removed_bytes_fraction"],
               "ppl": ppl, "ratio": {d: ppl[d] / dense[d] for d in domains}}
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        print(f"{name:12s} compress {tc:6.1f}s  " + " ".join(f"{d}={ppl[d]:.2f}({ppl[d] / dense[d]:.2f}x)"
                                                         for d in domains), flush=True)
        del res
    print("\n| lever | compress s | " + " | ".join(domains) + " |")
    print("|---|---|" + "---|" * len(domains))
    for r in rows:
        print(f"| {r['lever']} | {r['compress_s']} | " + " | ".join(f"{r['ppl'][d]:.2f} ({r['ratio'][d]:.2f}x)"
                                                               for d in domains) + " |")


if __name__ == "__main__":
    main()
