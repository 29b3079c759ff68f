"""CPU run-time memory and speed of a ROCKET model on ONNX Runtime: V kept packed (trt-target graph + the
``plugins_ort`` custom-op library), and every weight kept fp16 in memory (``ort-packed`` target: the same library's
``RocketMatMulF16`` + fp16 V values) against the lowered ``ort`` export and the dense fp32 export.

    python bench/bench_ort_packed.py /work/art/smol-0.3 --model smollm2-135m --out out/bench-ort-packed

Exports (skipped when the folder already exists): dense fp32 (ort target), the artifact with ``--target ort``
(V rebuilt dense at session start), with ``--target trt`` (the ``RocketSparseVMatMul`` node kept, run on the CPU
by the custom-op library; fp32 U and V values) and with ``--target ort-packed`` (fp16 weights, fp32 compute). Each is then measured in a FRESH process: ``/usr/bin/time -v rocket-deploy bench PATH
--batch 1 --prompt-len 64 --gen-len 32 --threads T --json`` (peak RSS, decode tokens/s), and the greedy tokens of
32 steps from a fixed prompt are compared with the dense-lowered ROCKET export. ``--rounds N`` measures the four
side by side N times, interleaved (peak RSS: the largest; decode tokens/s: the median of the rounds), so a busy
machine slows them alike. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RD = os.path.join(os.path.dirname(sys.executable), "rocket-deploy")
GREEDY = """
import json, sys
from rocket_deploy.runtime.bench import greedy_tokens
from rocket_deploy.runtime.ort_backend import OrtEngine
import os; e = OrtEngine(os.path.join(sys.argv[1], "model.onnx"), providers=["CPUExecutionProvider"], threads=int(sys.argv[2]), load_tokenizer=False)
print(json.dumps(greedy_tokens(e, list(range(100, 164)), 32)))
"""


def export(args, name, kind):
    path = os.path.join(args.out, name)
    if os.path.isfile(os.path.join(path, "model.onnx")):
        return path
    import torch
    from rocket_deploy.export import export_artifact, export_model
    torch.set_num_threads(args.threads)
    if kind == "dense":
        from rocket_deploy.models import load_model
        lm = load_model(args.model)
        export_model(lm.model, path, target="ort", dtype="fp32", tokenizer=lm.tokenizer, validate=False)
    else:
        # the ort-packed graph is validated against torch (through its standard-op copy): its weights moved to fp16
        res = export_artifact(args.artifact, path, target=kind, dtype="fp32", validate=kind == "ort-packed")
        if res.validation is not None:
            v = res.validation
            print(f"{name}: validation {'passed' if v['passed'] else 'FAILED'}, logits max rel "
                  f"{max(o['max_rel'] for st in v['steps'] for o in st['outputs'] if o['output'] == 'logits'):.2e}",
                  file=sys.stderr)
    print(f"exported {name} ({kind})", file=sys.stderr)
    return path


def measure(path, threads, bench_args):
    cmd = ["/usr/bin/time", "-v", RD, "bench", path, "--backend", "ort", *bench_args, "--threads", str(threads),
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"bench failed for {path}: {p.stderr.strip()[-600:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    line = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")][-1]
    rows = json.loads(line).get("rows") or [json.loads(line)]
    g = subprocess.run([sys.executable, "-c", GREEDY, path, str(threads)], capture_output=True, text=True)
    if g.returncode != 0:
        raise SystemExit(f"greedy run failed for {path}: {g.stderr.strip()[-600:]}")
    return {"peak_rss_gib": rss_kb / 2 ** 20, "decode_tokens_per_s": rows[0]["decode_tokens_per_s"],
            "prefill_ms": rows[0]["prefill_ms_median"],
            "tokens": json.loads(g.stdout.strip().splitlines()[-1])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="out/bench-ort-packed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-args", default="--batch 1 --prompt-len 64 --gen-len 32 --runs 3")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved measurement rounds (see above)")
    args = ap.parse_args(argv)
    from rocket_deploy.onnx_contract import onnx_file_bytes
    from rocket_deploy.report import format_table
    names = {"dense fp32 (ort)": ("dense-fp32", "dense"), "rocket ort (V rebuilt dense)": ("rocket-ort", "ort"),
             "rocket packed (trt graph + CPU op)": ("rocket-packed", "trt"),
             "rocket ort-packed (fp16 weights + CPU ops)": ("rocket-ort-packed", "ort-packed")}
    paths = {label: export(args, folder, kind) for label, (folder, kind) in names.items()}
    runs: dict[str, list[dict]] = {label: [] for label in names}
    for i in range(args.rounds):
        for label, path in paths.items():
            r = measure(path, args.threads, args.bench_args.split())
            runs[label].append(r)
            print(f"round {i + 1} {label}: {r['peak_rss_gib']:.3f} GiB, {r['decode_tokens_per_s']:.1f} tok/s, "
                  f"prefill {r['prefill_ms']:.0f} ms", file=sys.stderr)
    res = {}
    for label, rs in runs.items():
        res[label] = {"peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                      "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
                      "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
                      "decode_rounds": [round(r["decode_tokens_per_s"], 2) for r in rs],
                      "tokens": rs[0]["tokens"], "tokens_stable": all(r["tokens"] == rs[0]["tokens"] for r in rs),
                      "file_mb": onnx_file_bytes(os.path.join(paths[label], "model.onnx")) / 1e6}
    dense = res["dense fp32 (ort)"]
    ref_tokens = res["rocket ort (V rebuilt dense)"]["tokens"]
    rows = [[k, f"{r['file_mb']:.0f}", f"{r['peak_rss_gib']:.2f}", f"{r['peak_rss_gib'] / dense['peak_rss_gib']:.2f}",
             f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}",
             f"{r['prefill_ms']:.0f}", "yes" if r["tokens"] == ref_tokens else "NO"] for k, r in res.items()]
    print(format_table(["model", "file MB", "peak RSS GiB", "x dense", "decode tok/s", "x dense", "prefill ms",
                        "greedy = rocket ort"], rows))
    out = {"bench": "ort_packed", "artifact": os.path.abspath(args.artifact), "threads": args.threads,
           "bench_args": args.bench_args, "rounds": args.rounds, "results": {k: {kk: v for kk, v in r.items() if kk != "tokens"}
                                                      | {"same_tokens": r["tokens"] == ref_tokens}
                                                      for k, r in res.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
