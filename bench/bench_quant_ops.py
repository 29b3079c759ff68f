"""ONNX Runtime (CPU) speed of the quantized building blocks of export/quantized_ops.py vs an fp32 MatMul.

Shapes are SmolLM2-135M's projections (``x [M, K] @ W [K, N]``) and a typical ROCKET ``U`` (576 x 256);
``M`` = 1 (decode) and 128 (prefill). Prints a table and one JSON line.

    python bench/bench_quant_ops.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

SHAPES = {"q/o 576x576": (576, 576), "gate/up 576x1536": (576, 1536), "down 1536x576": (1536, 576),
          "U 576x256": (576, 256)}
KINDS = ("fp32", "int8-cast", "int8-dq-fused", "fp8-lut", "int8-dynamic", "int4-nbits", "int4-nbits-acc4")


def weights_for(kind: str, w: torch.Tensor, group: int) -> dict:
    from rocket_deploy.compress.quantize import quantize_cols, quantize_int4
    if kind == "fp32":
        return {"w": w.numpy()}
    if kind.startswith("int8"):
        q, s, _ = quantize_cols(w, "int8")
        return {"q": q.numpy(), "scales": s.numpy()}
    if kind == "fp8-lut":
        q, s, _ = quantize_cols(w, "fp8")
        return {"bits": q.view(torch.uint8).numpy(), "scales": s.numpy()}
    packed, scales, zeros, _ = quantize_int4(w, group)
    return {"packed": packed.numpy(), "scales": scales.float().numpy(), "zeros": zeros.numpy(), "block_size": group,
            "accuracy_level": 4 if kind.endswith("acc4") else None}


def time_session(sess, x: np.ndarray, runs: int) -> float:
    feed = {"X": x}
    for _ in range(5):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,128")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime as ort

    from rocket_deploy.export.quantized_ops import quant_linear_model

    rows = []
    torch.manual_seed(0)
    for label, (k, n) in SHAPES.items():
        w = torch.randn(k, n) / k ** 0.5
        for m in [int(t) for t in args.tokens.split(",")]:
            x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
            ref = x @ w.numpy()
            base = None
            for kind in KINDS:
                model = quant_linear_model(kind.removesuffix("-acc4"), k, n, weights_for(kind, w, args.group))
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
                y = sess.run(None, {"X": x})[0]
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                t = time_session(sess, x, args.runs)
                base = t if kind == "fp32" else base
                rows.append({"shape": label, "K": k, "N": n, "M": m, "kind": kind, "us": t * 1e6,
                             "speedup_vs_fp32": base / t, "rel_err": err,
                             "weight_bytes": sum(i.ByteSize() for i in model.graph.initializer)})
                print(f"{label:18s} M={m:<4d} {kind:13s} {t * 1e6:9.1f} us  x{base / t:5.2f}  rel.err {err:.2e}  "
                      f"{rows[-1]['weight_bytes'] / 1024:8.1f} KiB", flush=True)
    print()
    print("| shape | M | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for label in SHAPES:
        for m in [int(t) for t in args.tokens.split(",")]:
            cells = [next(r for r in rows if r["shape"] == label and r["M"] == m and r["kind"] == kd) for kd in KINDS]
            print(f"| {label} | {m} | " + " | ".join(f"{c['us']:.0f} us (x{c['speedup_vs_fp32']:.2f})" for c in cells) + " |")
    print(json.dumps({"onnxruntime": ort.__version__, "threads": args.threads, "group": args.group, "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
