"""SmolLM2-135M on ONNX Runtime (CPU): dense vs ROCKET at several budgets, exported with the ort target.

    python bench/bench_export_ort.py                       # budgets 0.2,0.3,0.4,0.5; writes a table + one JSON line
    python bench/bench_export_ort.py --budgets 0.3 --runs 5 --out out/bench-export

One profile (32 calibration samples x 256 tokens by default) serves every budget. Per model: the exported file size
against the dense fp16 export and the dense fp32 export, the decode throughput from ONE interleaved run of all
models (batch 1, random prompt), the export validation (max relative logits difference vs torch) and whether the
greedy tokens of torch and ORT are identical for 32 steps (fp32).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sources", default="stdlib,pyref,licenses",
                    help="calibration sources (the model-sampled 'selfgen' source is left out to keep time down)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--greedy-steps", type=int, default=32)
    ap.add_argument("--out", default="out/bench-export-ort")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from rocket_deploy.report import format_table
    from rocket_deploy.compress.pipeline import compress, prepare_calibration, run_profile
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.export import export_model
    from rocket_deploy.models import load_model
    from rocket_deploy.perplexity import perplexity
    from rocket_deploy.runtime.bench import BenchConfig, bench_side_by_side, greedy_tokens
    from rocket_deploy.runtime.ort_backend import OrtEngine
    from rocket_deploy.runtime.torch_backend import TorchEngine

    t0 = time.perf_counter()
    budgets = [float(b) for b in args.budgets.split(",")]
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    cal = CalibrationConfig(sources=tuple(args.sources.split(",")), samples=args.calib_samples, seq_len=args.seq_len,
                            eval_samples=8)
    data = prepare_calibration(tok, cal, model)
    log("profile")
    prof = run_profile(model, tok, RocketConfig(), cal, data=data, progress=False)
    held = data.heldout.ids
    prompt = held[0, :16].tolist()

    log("export dense fp32 / fp16")
    d32 = export_model(model, os.path.join(args.out, "dense-fp32"), target="ort", dtype="fp32", tokenizer=tok,
                       overwrite=True)
    d16 = export_model(model, os.path.join(args.out, "dense-fp16"), target="ort", dtype="fp16", tokenizer=tok,
                       overwrite=True)
    rows = [{"name": "dense", "budget": 0.0, "removed": 0.0, "ppl": perplexity(model, held), "path": d32.path,
             "bytes": d32.file_bytes, "max_rel": _max_rel(d32.validation), "passed": d32.validation["passed"],
             "greedy_identical": _same(TorchEngine(model, tok, "cpu"), d32.path, prompt, args.greedy_steps),
             "lowering": None}]
    for b in budgets:
        log(f"budget {b}: compress + export")
        res = compress(model, tok, RocketConfig(budget=b), cal, data=data, profile=prof, progress=False)
        ex = export_model(res.model, os.path.join(args.out, f"rocket-{b:g}"), target="ort", dtype="fp32",
                          tokenizer=tok, overwrite=True)
        rows.append({"name": f"rocket-{b:g}", "budget": b, "removed": res.manifest["budget"]["removed_bytes_fraction"],
                     "ppl": perplexity(res.model, held), "path": ex.path, "bytes": ex.file_bytes,
                     "max_rel": _max_rel(ex.validation), "passed": ex.validation["passed"],
                     "greedy_identical": _same(TorchEngine(res.model, tok, "cpu"), ex.path, prompt, args.greedy_steps),
                     "lowering": ex.stats.get("lowering"),
                     "layers": _layer_mix(res.manifest)})
        del res
        gc.collect()
    del model
    gc.collect()
    log("speed: all models side by side (interleaved runs)")
    engines = {r["name"]: OrtEngine(r["path"], threads=args.threads, tokenizer=tok) for r in rows}
    cfg = BenchConfig(batches=(1,), prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=1, runs=args.runs)
    speed = bench_side_by_side(engines, cfg)
    dense_tps = speed["dense"]["rows"][0]["decode_tokens_per_s"]
    for r in rows:
        s = speed[r["name"]]["rows"][0]
        r.update(decode_tps=s["decode_tokens_per_s"], decode_ms=s["decode_ms_per_step"], prefill_ms=s["prefill_ms_median"],
                 speedup=s["decode_tokens_per_s"] / dense_tps, vs_fp16=r["bytes"] / d16.file_bytes,
                 vs_fp32=r["bytes"] / d32.file_bytes)
    hdr = ["model", "removed", "ppl", "MB", "x dense fp16", "x dense fp32", "decode tok/s", "x dense", "prefill ms",
           "max rel logits", "greedy 32 equal"]
    table = [[r["name"], r["removed"], r["ppl"], r["bytes"] / 1e6, r["vs_fp16"], r["vs_fp32"], r["decode_tps"],
              r["speedup"], r["prefill_ms"], r["max_rel"], r["greedy_identical"]] for r in rows]
    print(f"dense fp16 export: {d16.file_bytes / 1e6:.1f} MB; dense fp32 export: {d32.file_bytes / 1e6:.1f} MB; "
          f"ORT CPU, batch 1, prompt {args.prompt_len}, {args.gen_len} tokens, {args.runs} interleaved runs")
    print(format_table(hdr, table))
    r3 = next((r for r in rows if r["budget"] == 0.3), None)
    aims = None if r3 is None else {"file_le_0.75x_dense_fp16": r3["vs_fp16"] <= 0.75, "decode_ge_1.1x_dense": r3["speedup"] >= 1.1}
    out = {"bench": "export_ort", "model": args.model, "dense_fp16_bytes": d16.file_bytes, "dense_fp32_bytes": d32.file_bytes,
           "config": vars(args), "aims_at_0.3": aims, "seconds": round(time.perf_counter() - t0, 1),
           "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(json.dumps(out, default=float, sort_keys=True))


def _max_rel(report):
    return max(o["max_rel"] for s in report["steps"] for o in s["outputs"] if o["output"] == "logits")


def _same(torch_engine, onnx_path, prompt, steps):
    from rocket_deploy.runtime.bench import greedy_tokens
    from rocket_deploy.runtime.ort_backend import OrtEngine
    a = greedy_tokens(torch_engine, prompt, steps)
    b = greedy_tokens(OrtEngine(onnx_path, load_tokenizer=False), prompt, steps)
    return a == b


def _layer_mix(manifest):
    layers = [r for r in manifest["layers"].values() if r["kind"] == "rocket"]
    return {"rocket": len(layers), "dense_v": sum(r["keep"] == r["rank"] for r in layers),
            "dense": sum(r["kind"] == "dense" for r in manifest["layers"].values())}


if __name__ == "__main__":
    main()
