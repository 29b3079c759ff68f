"""Quantized artifacts on ONNX Runtime (CPU): export each to the ort target and measure decode speed and file bytes
side by side with the dense fp32 export of the same model.

    python bench/bench_quant_export.py smol-0.5-int8 smol-0.5-fp8 smol-0.5-int4 smol-int4-dense
    python bench/bench_quant_export.py ART... --dense smollm2-135m --threads 1,2 --runs 5 --out out/bench-quant-export

Per artifact (any format version: unquantized ones work too): ``export_artifact(..., target="ort")`` with the given
``--int8-compute`` / ``--int4-accuracy-level``, the export validation's max relative logits difference against the
torch model loaded from the artifact, the file bytes (model.onnx + external data) against the dense fp32 export,
and the greedy decode throughput of batch 1 (``--prompt-len`` random prompt tokens, then ``--gen-len`` new tokens,
``rocket_deploy.runtime.bench``) for every ``--threads`` setting -- all models of one thread setting in ONE
interleaved run (``bench_side_by_side``), so a busy machine slows them alike. A table, then one JSON line.
The dense model defaults to the ``source.spec`` recorded in the first artifact's rocket.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="artifact directories (rocket-deploy compress --out ...)")
    ap.add_argument("--dense", default=None, help="dense model spec (default: the artifacts' recorded source)")
    ap.add_argument("--threads", default="1,2", help="ORT intra-op thread counts to measure")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--int8-compute", choices=["weight-only", "dynamic"], default="weight-only")
    ap.add_argument("--int4-accuracy-level", type=int, choices=range(5), default=None)
    ap.add_argument("--no-validate", action="store_true", help="skip the ORT vs torch validation of each export")
    ap.add_argument("--out", default="out/bench-quant-export")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_export_ort import _max_rel

    from rocket_deploy.artifact import read_manifest
    from rocket_deploy.report import format_table
    from rocket_deploy.export import export_artifact, export_model
    from rocket_deploy.models import load_model
    from rocket_deploy.runtime.bench import BenchConfig, bench_side_by_side
    from rocket_deploy.runtime.ort_backend import OrtEngine

    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    threads = [int(t) for t in args.threads.split(",")]
    manifests = {a: read_manifest(a) for a in args.artifacts}
    dense_spec = args.dense or manifests[args.artifacts[0]].get("source", {}).get("spec")
    if not dense_spec:
        ap.error("the first artifact records no source model; pass --dense SPEC")

    log(f"export dense fp32 ({dense_spec})")
    lm = load_model(dense_spec)
    dense = export_model(lm.model, os.path.join(args.out, "dense-fp32"), target="ort", dtype="fp32",
                         tokenizer=lm.tokenizer, validate=not args.no_validate, overwrite=True)
    del lm
    gc.collect()
    rows = [{"name": "dense-fp32", "artifact": None, "quantize": None, "path": dense.path,
             "bytes": dense.file_bytes, "max_rel": _max_rel(dense.validation) if dense.validation else None,
             "passed": dense.validation["passed"] if dense.validation else None, "quantization": None,
             "export_s": dense.seconds}]
    used = {"dense-fp32"}
    for a in args.artifacts:
        name = os.path.basename(os.path.normpath(a))
        while name in used:
            name += "'"
        used.add(name)
        log(f"export {name}")
        ex = export_artifact(a, os.path.join(args.out, name), target="ort", dtype="fp32", overwrite=True,
                             validate=not args.no_validate, int8_compute=args.int8_compute,
                             int4_accuracy_level=args.int4_accuracy_level)
        m = manifests[a]
        rows.append({"name": name, "artifact": os.path.abspath(a), "quantize": (m.get("config") or {}).get("quantize"),
                     "method": m.get("method"), "budget": (m.get("budget") or {}).get("target_removed_fraction"),
                     "path": ex.path, "bytes": ex.file_bytes,
                     "max_rel": _max_rel(ex.validation) if ex.validation else None,
                     "passed": ex.validation["passed"] if ex.validation else None,
                     "quantization": ex.stats.get("quantization"), "lowering": ex.stats.get("lowering"),
                     "export_s": ex.seconds})
        gc.collect()

    cfg = BenchConfig(batches=(1,), prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=args.warmup,
                      runs=args.runs)
    for t in threads:
        log(f"speed, {t} thread(s): {len(rows)} models side by side (interleaved runs)")
        engines = {r["name"]: OrtEngine(r["path"], threads=t, load_tokenizer=False) for r in rows}
        speed = bench_side_by_side(engines, cfg)
        for r in rows:
            s = speed[r["name"]]["rows"][0]
            r[f"decode_tps_{t}t"] = s["decode_tokens_per_s"]
            r[f"prefill_ms_{t}t"] = s["prefill_ms_median"]
        for e in engines.values():
            e.close()
        del engines
        gc.collect()
    base = rows[0]
    for r in rows:
        r["x_dense_bytes"] = r["bytes"] / base["bytes"]
        for t in threads:
            r[f"x_dense_{t}t"] = r[f"decode_tps_{t}t"] / base[f"decode_tps_{t}t"]

    hdr = ["model", "quantize", "MB", "x dense bytes"]
    for t in threads:
        hdr += [f"tok/s {t}t", f"x dense {t}t"]
    hdr += ["max rel logits", "ort compute"]
    table = []
    for r in rows:
        how = (r["quantization"] or {}).get("compute", "fp32")
        line = [r["name"], r["quantize"] or "-", r["bytes"] / 1e6, r["x_dense_bytes"]]
        for t in threads:
            line += [r[f"decode_tps_{t}t"], r[f"x_dense_{t}t"]]
        table.append(line + [r["max_rel"], how])
    print(f"ORT CPU, batch 1, prompt {args.prompt_len} tokens, {args.gen_len} new tokens (greedy), "
          f"{args.runs} interleaved runs per thread setting; dense fp32 export {base['bytes'] / 1e6:.1f} MB")
    print(format_table(hdr, table))
    out = {"bench": "quant_export_ort", "dense": dense_spec, "config": vars(args),
           "seconds": round(time.perf_counter() - t0, 1),
           "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(json.dumps(out, default=float, sort_keys=True))


if __name__ == "__main__":
    main()
