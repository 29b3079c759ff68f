"""Quality per byte (issue 11): dense int8 / int4 (RTN and GPTQ), ROCKET fp16, ROCKET+int8, ROCKET+int4 at several
budgets with each quantization lever on and off, on every evaluation domain -- above all the never-calibrated ones.

One profile per quantization setting (kept under --profile-root and reused), then every run from it. Each run
reports, per domain, perplexity x dense, mean KL(dense || compressed) of the next-token distribution and top-1
agreement with the dense model's greedy token, plus the worst and mean over the never-calibrated domains. The
dense model's logits are computed once per evaluation batch and kept on disk (fp16) for every later run.
Prints one ``ROW {...}`` line per run as it goes, then the Pareto table, a plot and one JSON line.

    python bench/bench_quality_per_byte.py --profile-root /tmp/qpb --plot docs/img/quality-per-byte.png
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

SETTINGS = {        # profile name -> RocketConfig fields that change what the profile holds
    "int4-gptq": {"quantize": "int4", "quant_method": "gptq"},
    "int4-gptq-ao": {"quantize": "int4", "quant_method": "gptq", "quant_act_order": True},
    "int4-v4": {"quantize": "int4", "quant_method": "gptq", "quant_act_order": True, "quant_v_bits": 4},
    "int4-rtn": {"quantize": "int4"},
    "fp16": {},
    "int8": {"quantize": "int8"},
}


def dense_runs(args) -> list[tuple[str, dict]]:
    """Dense weights quantized (``dense-quant``) for ``--dense-schemes``: they use only a profile's Grams, so the
    first profile of the run serves them."""
    out = []
    for q in [x for x in args.dense_schemes.split(",") if x]:
        out += [(f"dense {q} RTN", {"method": "dense-quant", "quantize": q, "quant_method": "rtn"}),
                (f"dense {q} GPTQ act-order", {"method": "dense-quant", "quantize": q, "quant_method": "gptq",
                                               "quant_act_order": True})]
    return out


def runs_for(setting: str, args) -> list[tuple[str, dict]]:
    """(label, RocketConfig fields) of every run served by the profile of ``setting``."""
    b = lambda s: [float(x) for x in s.split(",") if x]
    if setting == "int4-gptq":
        out = [("dense int4 GPTQ", {"method": "dense-quant", "quant_method": "gptq"}),
               ("dense int4 GPTQ act-order", {"method": "dense-quant", "quant_method": "gptq", "quant_act_order": True})]
        for x in b(args.int4_budgets):
            out.append((f"ROCKET+int4 @{x} [dense GPTQ]", {"budget": x}))
            out.append((f"ROCKET+int4 @{x} [dense GPTQ, U GPTQ + V refit]", {"budget": x, "quant_u_method": "gptq",
                                                                            "quant_v_refit": True}))
        mid = b(args.int4_budgets)[len(b(args.int4_budgets)) // 2]
        out.append((f"ROCKET+int4 @{mid} [dense GPTQ, U GPTQ]", {"budget": mid, "quant_u_method": "gptq"}))
        return out
    if setting == "int4-gptq-ao":      # act-order for the dense option and for GPTQ on U
        return [(f"ROCKET+int4 @{x} [dense GPTQ-AO, U GPTQ-AO + V refit]",
                 {"budget": x, "quant_u_method": "gptq", "quant_v_refit": True}) for x in b(args.int4_budgets)]
    if setting == "int4-v4":           # int4-gptq-ao with V's kept values at 4 bits (quant_v_bits=4)
        return [(f"ROCKET+int4 @{x} [dense GPTQ-AO, U GPTQ-AO + V refit, V int4s]",
                 {"budget": x, "quant_u_method": "gptq", "quant_v_refit": True}) for x in b(args.int4_budgets)]
    if setting == "int4-rtn":
        return ([("dense int4 RTN", {"method": "dense-quant"})]
                + [(f"ROCKET+int4 @{x} [RTN]", {"budget": x}) for x in b(args.int4_budgets)])
    if setting == "fp16":
        return [(f"ROCKET @{x}", {"budget": x}) for x in b(args.budgets)]
    return [(f"ROCKET+int8 @{x}", {"budget": x}) for x in b(args.int8_budgets)]


class CachedDense:
    """Stands in for the dense model in :func:`rocket_deploy.perplexity.fidelity_vs_dense`: logits of each batch
    computed once, then read back from disk (fp16; KL and agreement computed from them)."""

    def __init__(self, model, cache_dir: str):
        self.model, self.dir = model, cache_dir
        os.makedirs(cache_dir, exist_ok=True)

    def eval(self):
        return self

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None):
        key = hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:20]
        path = os.path.join(self.dir, key + ".pt")
        if os.path.isfile(path):
            return SimpleNamespace(logits=torch.load(path).float())
        lg = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.to(torch.float16)
        torch.save(lg, path + ".tmp")
        os.replace(path + ".tmp", path)
        return SimpleNamespace(logits=lg.float())


def pareto_front(points):
    front, best = [], float("inf")
    for b, p in sorted(points):
        if p < best:
            front.append((b, p))
            best = p
    return front


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--domains", default="stdlib,pyref,licenses,selfgen,never-calibrated")
    ap.add_argument("--settings", default="int4-gptq,int4-rtn,fp16,int8", help=f"profiles to run, from {list(SETTINGS)}")
    ap.add_argument("--budgets", default="0.2,0.3", help="ROCKET fp16 budgets")
    ap.add_argument("--int8-budgets", default="0.6")
    ap.add_argument("--dense-schemes", default="int8", help="dense-quant rows (RTN and GPTQ act-order) besides int4")
    ap.add_argument("--int4-budgets", default="0.72,0.76,0.8")
    ap.add_argument("--profile-root", default=None, help="profiles (and the dense logits cache) live here")
    ap.add_argument("--rows-from", default=None, help="comma-separated logs of earlier runs: rebuild the table, "
                                                       "plot and JSON line from their ROW lines (no computation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--no-dense-row", action="store_true", help="skip evaluating the dense model itself (a later "
                    "part of a run whose first log has it; combine the logs with --rows-from)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rows_from:
        return report_from_logs(args)
    if not args.profile_root:
        ap.error("--profile-root is required (profiles and the dense logits cache are kept there)")

    from rocket_deploy.compress.pipeline import compress, load_or_profile, prepare_calibration
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.corpus import NEVER_CALIBRATED
    from rocket_deploy.evaluation import compare, expand_domains, heldout_split, never_calibrated_summary
    from rocket_deploy.models import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model)
    cal = CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len, eval_samples=args.eval_samples)
    data = prepare_calibration(lm.tokenizer, cal, lm.model)
    domains = expand_domains(args.domains.split(","), cal)
    splits = [heldout_split(lm.tokenizer, cal, d, model=lm.model) for d in domains]
    dense = CachedDense(lm.model, os.path.join(args.profile_root, "dense-logits"))
    never = [d for d in domains if d in NEVER_CALIBRATED and d not in cal.sources]
    print(f"domains: {domains} (never calibrated: {never}); tokens per domain: {[s.n_tokens for s in splits]}",
          flush=True)

    def evaluate(model, label, extra):
        t = time.perf_counter()
        res = compare(model, dense, splits)
        summ = never_calibrated_summary(res, cal)
        row = {"label": label, **extra, "domains": {r.domain: {"ppl": r.compressed, "dense": r.dense, "ratio": r.ratio,
                                                                "kl": r.kl, "top1": r.top1_agreement} for r in res},
               "never_worst": summ["worst_ratio"] if summ else None, "never_mean": summ["mean_ratio"] if summ else None,
               "never_kl": summ["mean_kl"] if summ else None, "never_top1": summ["mean_top1"] if summ else None,
               "eval_s": round(time.perf_counter() - t, 1)}
        print("ROW " + json.dumps(row), flush=True)
        return row

    rows = [] if args.no_dense_row else [evaluate(lm.model, "dense fp16", {"family": "dense", "bytes_ratio": 1.0})]
    timings = {"profile_s": {}}
    for setting in [s for s in args.settings.split(",") if s]:
        fields = SETTINGS[setting]
        base = RocketConfig(safeguard=False, **fields)
        t = time.perf_counter()
        prof = load_or_profile(lm.model, lm.tokenizer, base, cal, data, os.path.join(args.profile_root, setting),
                               progress=False, log=lambda m: print(m, flush=True))
        timings["profile_s"][setting] = round(time.perf_counter() - t, 1)
        print(f"profile {setting}: {timings['profile_s'][setting]} s (profile.seconds {prof.seconds:.1f})", flush=True)
        runs = runs_for(setting, args) + (dense_runs(args) if setting == args.settings.split(",")[0] else [])
        for label, kw in runs:
            cfg = RocketConfig(**{**dataclass_fields(base), **kw})
            t = time.perf_counter()
            res = compress(lm.model, lm.tokenizer, cfg, cal, data=data, profile=prof, progress=False)
            c_s = round(time.perf_counter() - t, 1)
            bm = res.manifest["budget"]
            recs = res.manifest["layers"].values()
            with_rtn = [r for r in recs if "rel_whitened_rtn" in r]
            extra = {"family": ("dense" if cfg.method == "dense-quant" else "ROCKET") + (f"+{cfg.quantize}" if cfg.quantize else ""),
                     "setting": setting, "config": {k: v for k, v in kw.items()}, "bytes_ratio": bm["bytes_ratio"],
                     "layers_dense": bm["layers_dense"], "compress_s": c_s,
                     "sum_rel_whitened_sq": sum(r["rel_whitened"] ** 2 for r in recs),
                     "sum_rel_whitened_sq_rtn": (sum(r["rel_whitened_rtn"] ** 2 for r in with_rtn)
                                                 + sum(r["rel_whitened"] ** 2 for r in recs if "rel_whitened_rtn" not in r))
                     if with_rtn else None}
            rows.append(evaluate(res.model, label, extra))
            del res
        del prof
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"timings: {timings}")
    if rows and rows[0]["label"] == "dense fp16":
        report(rows, domains, never, args, timings, cal)


def report_from_logs(args) -> None:
    """Table, plot and JSON line from the ``ROW`` lines of earlier runs (first dense row kept, later ones dropped)."""
    from rocket_deploy.config import CalibrationConfig
    from rocket_deploy.corpus import NEVER_CALIBRATED
    rows, seen = [], set()
    for path in args.rows_from.split(","):
        with open(path) as f:
            for line in f.read().replace("\r", "\n").splitlines():
                if line.startswith("ROW "):
                    r = json.loads(line[4:])
                    if r["label"] not in seen:
                        seen.add(r["label"])
                        rows.append(r)
    if not rows or rows[0]["label"] != "dense fp16":
        raise SystemExit("--rows-from: the first log must start with the dense fp16 row")
    cal = CalibrationConfig(samples=args.calib_samples, seq_len=args.seq_len, eval_samples=args.eval_samples)
    domains = list(rows[0]["domains"])
    never = [d for d in domains if d in NEVER_CALIBRATED and d not in cal.sources]
    report(rows, domains, never, args, {"from_logs": args.rows_from}, cal)


def dataclass_fields(cfg) -> dict:
    import dataclasses
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def report(rows, domains, never, args, timings, cal):
    front = set(pareto_front([(r["bytes_ratio"], r["never_mean"]) for r in rows if r["never_mean"] is not None]))
    short = {d: d[:9] for d in domains}
    head = ["configuration", "bytes", *[short[d] + ("*" if d in never else "") for d in domains], "never worst",
            "never mean", "KL never", "top-1 never", "Pareto (never mean)"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in sorted(rows, key=lambda r: -r["bytes_ratio"]):
        cells = [r["label"], f"{r['bytes_ratio']:.3f}"]
        cells += [f"{r['domains'][d]['ratio']:.3f}" for d in domains]
        cells += [f"{r['never_worst']:.3f}", f"{r['never_mean']:.3f}", f"{r['never_kl']:.4f}", f"{r['never_top1']:.3f}",
                  "yes" if (r["bytes_ratio"], r["never_mean"]) in front else ""]
        print("| " + " | ".join(cells) + " |")
    print(f"(* never calibrated; perplexity x dense per domain; dense perplexities: "
          f"{ {d: round(rows[0]['domains'][d]['ppl'], 2) for d in domains} })")
    print(f"timings: {timings}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
        for ax, key, title in ((axes[0], "never_mean", "mean over never-calibrated domains"),
                               (axes[1], "never_worst", "worst never-calibrated domain")):
            for fam in dict.fromkeys(r["family"] for r in rows):
                pts = sorted((r["bytes_ratio"], r[key]) for r in rows if r["family"] == fam)
                ax.plot(*zip(*pts), "o-" if fam.startswith("ROCKET") else "s", label=fam)
            ax.set_yscale("log")
            ax.set_xlabel("bytes of the targeted layers (x dense fp16)")
            ax.set_ylabel("perplexity x dense")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")
    print(json.dumps({"model": args.model, "calibration": cal.to_dict(), "domains": domains, "never_calibrated": never,
                      "rows": rows, "timings_s": timings}, default=float))


if __name__ == "__main__":
    sys.exit(main())
