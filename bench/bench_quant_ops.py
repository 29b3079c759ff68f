"""ONNX Runtime (CPU) speed of one quantized layer as the exporter writes it vs an fp32 MatMul.

Every graph but ``int8-dynamic`` is a one-layer ``QuantDenseLinear`` (or, for ``fp32``, an ``nn.Linear``) exported
by ``rocket_deploy.export.driver.export_layer`` -- the stand-ins, translations, optimizer and ort passes of a real
export (export/quant_ops.py, export/quant_ort.py). ``int8-dynamic`` (DynamicQuantizeLinear -> MatMulInteger) is
not something the exporter emits; it is built here with ``onnx.helper`` for the speed comparison only.

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


# kind -> (storage format, export options of export_layer)
EXPORT_KINDS = {"int8-cast": ("int8", {}), "int8-dq-fused": ("int8", {"int8_compute": "dynamic"}),
                "fp8-lut": ("fp8", {}), "int4-nbits": ("int4", {"int4_accuracy_level": 0}),
                "int4-nbits-acc4": ("int4", {"int4_accuracy_level": 4})}


def dynamic_int8_model(q: np.ndarray, scales: np.ndarray):
    """``Y ~ X @ (q * scales)`` with X quantized per tensor at run time: DynamicQuantizeLinear -> MatMulInteger
    (int32) -> Cast -> Mul by ``x_scale * scales``; ``q int8 [K, N]``. Not weight-only (adds activation error)."""
    from onnx import TensorProto, helper, numpy_helper
    k, n = q.shape
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "q", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "scales"], ["cs"]),
             helper.make_node("Mul", ["accf", "cs"], ["y"])]
    graph = helper.make_graph(nodes, "int8-dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(q.astype(np.int8), "q"),
                               numpy_helper.from_array(scales.astype(np.float32), "scales")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def layer_model(kind: str, w: torch.Tensor, group: int):
    """The ONNX ModelProto of ``kind`` for the weight ``w [K, N]`` (input ``[M, K]``, M dynamic)."""
    import onnx_ir as ir

    from rocket_deploy.compress.quantize import quantize_cols, quantize_matrix
    from rocket_deploy.export.driver import export_layer
    from rocket_deploy.quant_linear import QuantDenseLinear
    if kind == "int8-dynamic":
        q, s, _ = quantize_cols(w, "int8")
        return dynamic_int8_model(q.numpy(), s.numpy())
    opts = {}
    if kind == "fp32":
        layer = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w.t())
    else:
        fmt, opts = EXPORT_KINDS[kind]
        layer = QuantDenseLinear.from_quantized(quantize_matrix(w, fmt, None, group))
    model, _ = export_layer(layer, torch.zeros(2, w.shape[0]), **opts)
    return ir.to_proto(model)


def time_session(sess, x: np.ndarray, runs: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
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

    rows = []
    torch.manual_seed(0)                # every weight drawn up front: tracing may draw from the global generator
    weights = {label: torch.randn(k, n) / k ** 0.5 for label, (k, n) in SHAPES.items()}
    for label, (k, n) in SHAPES.items():
        w = weights[label]
        for m in [int(t) for t in args.tokens.split(",")]:
            x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
            ref = x @ w.numpy()
            base = None
            for kind in KINDS:
                model = layer_model(kind, w, args.group)
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
                y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
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
