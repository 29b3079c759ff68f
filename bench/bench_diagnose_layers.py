"""Where does ROCKET's out-of-domain error come from (issue 11)? Per layer, at one budget's allocation.

For every compressed layer, the relative output error ``||X dW||_F / ||X W||_F`` of the chosen factorization on
  fit     the calibration tokens the whitening was fitted on (the profile's Gram),
  held    held-out calibration documents (same domains, unseen tokens),
  ood     never-calibrated package docs (half B),
and, on the same ood tokens, three alternative fits at the same (rank, keep):
  oracle  whitening fitted on the other half (A) of the package docs (what a perfect Gram would give),
  damp    Gram damping 0.01 (``H + 0.01 mean(diag H) I``),
  refit2  two rounds of V-on-support / U refit (compress/refit.py).
fit -> held is Gram over-fit within the domains; held -> ood is the domain shift; ood -> oracle is the part of
the shift that better whitening could recover (the rest is the rank/sparsity the allocation gave the layer).
Grams come from one dense forward pass per token set (the same GramAccumulator as the profile).

    python bench/bench_diagnose_layers.py --profile-dir /tmp/h4b/prof-fp16 --budget 0.3
"""
from __future__ import annotations

import argparse
import collections
import json
import math

import torch


def collect_grams(model, targets, ids, batch_size=8):
    from rocket_deploy.compress.calibration import GramAccumulator
    acc = GramAccumulator(targets)
    with torch.no_grad(), acc:
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i:i + batch_size]
            model(input_ids=b, attention_mask=torch.ones_like(b))
            acc.end_batch()
    return {n: (acc.gram(n) / acc.tokens[acc.group_of[n]]).float() for n in targets}


def rel_err(g, dw, w):
    g = g.double()
    return math.sqrt(float((dw * (g @ dw)).sum()) / max(float((w * (g @ w)).sum()), 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ood", default="pkgdocs")
    ap.add_argument("--ood-samples", type=int, default=16, help="per half")
    ap.add_argument("--profile-dir", required=True)
    ap.add_argument("--refit-rounds", type=int, default=2, help="0 skips the refit columns (the slow part)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shrink", default="", help="comma list of a: also fit with the Gram shrunk towards its "
                    "diagonal, (1-a) H + a diag(H); columns shr<a>_held / shr<a>_ood")
    ap.add_argument("--more-samples", type=int, default=0, help="also fit with the Gram of this many calibration "
                    "samples of the same mix (columns more_held / more_ood)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rocket_deploy.compress.allocate import allocate
    from rocket_deploy.compress.factorize import eigenbasis, factorize
    from rocket_deploy.compress.pipeline import load_or_profile, prepare_calibration
    from rocket_deploy.compress.profile import weight_in_out
    from rocket_deploy.compress.whitening import damped_gram, inverse_upper, whitening_factor
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.corpus import chunk_tokens, load_source, split_documents
    from rocket_deploy.models import load_model
    from rocket_deploy.targets import select_targets

    lm = load_model(args.model)
    cal = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    data = prepare_calibration(lm.tokenizer, cal, lm.model)
    cfg = RocketConfig(budget=args.budget)
    prof = load_or_profile(lm.model, lm.tokenizer, cfg, cal, data, args.profile_dir, progress=False, log=print)
    choice = allocate(prof, cfg).choice
    targets = select_targets(lm.model, cfg.targets, cfg.exclude)
    half_a, half_b = split_documents(load_source(args.ood), 0.5, cal.seed)
    ood_a = chunk_tokens(lm.tokenizer, half_a, cal.seq_len, args.ood_samples, args.ood).ids
    ood_b = chunk_tokens(lm.tokenizer, half_b, cal.seq_len, args.ood_samples, args.ood).ids
    grams = {"held": collect_grams(lm.model, targets, data.heldout.ids),
             "ood": collect_grams(lm.model, targets, ood_b), "oodA": collect_grams(lm.model, targets, ood_a)}
    variants = {}     # name -> {layer: Gram} used for whitening; evaluated on held and ood
    for a in [float(x) for x in args.shrink.split(",") if x]:
        variants[f"shr{a:g}"] = a
    if args.more_samples:
        more = prepare_calibration(lm.tokenizer, CalibrationConfig(samples=args.more_samples, seq_len=args.seq_len),
                                   lm.model)
        variants["more"] = collect_grams(lm.model, targets, more.calib.ids)
    rows, whit = [], {}
    for name, opt in choice.items():
        if opt is None:
            continue
        lp = prof.layers[name]
        w = weight_in_out(targets[name]).double()
        eb = prof.eigenbasis(name, w)
        g_fit = eb.s.t() @ eb.s
        r = {"layer": name, "kind": name.rsplit(".", 1)[-1], "rank": opt.rank, "keep": opt.keep,
             "kept_bytes": opt.bytes / lp.dense_bytes}
        f = factorize(eb, opt.rank, opt.keep)
        dw = w - f.u @ f.v
        r.update(fit=rel_err(g_fit, dw, w), held=rel_err(grams["held"][name], dw, w), ood=rel_err(grams["ood"][name], dw, w))
        if args.refit_rounds:
            f2 = factorize(eb, opt.rank, opt.keep, refit_rounds=args.refit_rounds)
            dw2 = w - f2.u @ f2.v
            r.update(refit2_fit=rel_err(g_fit, dw2, w), refit2_held=rel_err(grams["held"][name], dw2, w),
                     refit2=rel_err(grams["ood"][name], dw2, w))
        for key, gram in (("oracle", grams["oodA"][name].double()), ("damp", damped_gram(g_fit, 0.01))):
            ck = (key, lp.group)
            if ck not in whit:
                s, _ = whitening_factor(gram)
                whit[ck] = (s, inverse_upper(s))
            fo = factorize(eigenbasis(w, *whit[ck]), opt.rank, opt.keep)
            r[key] = rel_err(grams["ood"][name], w - fo.u @ fo.v, w)
        for key, spec in variants.items():
            ck = (key, lp.group)
            if ck not in whit:
                if isinstance(spec, float):
                    gram = (1 - spec) * g_fit + spec * torch.diag(torch.diagonal(g_fit))
                else:
                    gram = spec[name].double()
                s, _ = whitening_factor(gram)
                whit[ck] = (s, inverse_upper(s))
            fo = factorize(eigenbasis(w, *whit[ck]), opt.rank, opt.keep)
            dwo = w - fo.u @ fo.v
            r[key + "_held"] = rel_err(grams["held"][name], dwo, w)
            r[key + "_ood"] = rel_err(grams["ood"][name], dwo, w)
        rows.append(r)
        print("ROW " + json.dumps(r), flush=True)
    cols = ["fit", "held", "ood", "oracle", "damp"] + (["refit2_fit", "refit2_held", "refit2"] if args.refit_rounds else [])
    cols += [k + sfx for k in variants for sfx in ("_held", "_ood")]
    by = collections.defaultdict(list)
    for r in rows:
        by[r["kind"]].append(r)
    by["all"] = rows
    print(f"\nbudget {args.budget}: mean relative output error per layer kind ({len(rows)} compressed layers)")
    print("| kind | n | kept bytes | " + " | ".join(cols) + " | ood/held |")
    print("|---|---|---|" + "---|" * (len(cols) + 1))
    for k, rs in by.items():
        m = {c: sum(x[c] for x in rs) / len(rs) for c in cols + ["kept_bytes"]}
        print(f"| {k} | {len(rs)} | {m['kept_bytes']:.2f} | " + " | ".join(f"{m[c]:.3f}" for c in cols)
              + f" | {m['ood'] / m['held']:.2f} |")
    grow = [r["ood"] / r["held"] for r in rows]
    kb = [r["kept_bytes"] for r in rows]
    mg, mk = sum(grow) / len(grow), sum(kb) / len(kb)
    cov = sum((a - mg) * (b - mk) for a, b in zip(grow, kb))
    corr = cov / math.sqrt(sum((a - mg) ** 2 for a in grow) * sum((b - mk) ** 2 for b in kb) + 1e-30)
    print(f"correlation(ood/held growth, kept bytes) = {corr:.2f}")
    worst = sorted(rows, key=lambda r: -r["ood"] / r["held"])[:8]
    print("largest ood/held growth: " + ", ".join(f"{r['layer'].replace('model.layers.', 'L')} "
                                                  f"{r['held']:.3f}->{r['ood']:.3f}" for r in worst))


if __name__ == "__main__":
    main()
