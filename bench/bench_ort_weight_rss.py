"""Peak RSS of an ONNX Runtime CPU session holding one lm_head-sized weight ``[49152, 576]`` (SmolLM2's), stored
four ways: fp16 + ``rocket.RocketMatMulF16`` (the ort-packed target's form) inline in ``model.onnx`` and as external
data; fp32 ``MatMul``; fp16 + ``Cast`` + ``MatMul`` (what ``--target ort`` stores: ORT folds it back to fp32).

    python bench/bench_ort_weight_rss.py --out /tmp/weight-rss

Each graph is opened and run once in a fresh process; prints its peak RSS (``VmHWM``) after the imports and after
the run, and one JSON line (Linux). Needs the ``plugins_ort`` custom-op library (built on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import os, sys
import numpy as np
import onnxruntime as ort
def hwm():       # peak RSS of this process image in kB (ru_maxrss would carry the forking parent's over)
    return int([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0].split()[1])
path, lib = sys.argv[1], sys.argv[2]
base = hwm()
so = ort.SessionOptions()
so.intra_op_num_threads = 1
if lib:
    so.register_custom_ops_library(lib)
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
s.run(None, {"x": np.ones((1, 1, int(sys.argv[3])), np.float32)})
print(base, hwm())
"""


def build(out: str, n: int, k: int) -> dict[str, tuple[str, bool]]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rocket_deploy.onnx_contract import F16_MATMUL_OP, ONNX_DOMAIN
    os.makedirs(out, exist_ok=True)
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float16)

    def save(nodes, inits, name, external=False):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ONNX_DOMAIN, 1)])
        path = os.path.join(out, f"{name}.onnx")
        onnx.save(m, path, save_as_external_data=external, location=f"{name}.onnx.data" if external else None)
        return path

    f16 = [helper.make_node(F16_MATMUL_OP, ["x", "w"], ["y"], domain=ONNX_DOMAIN, in_features=k, out_features=n)]
    return {
        "fp16 RocketMatMulF16, inline": (save(f16, [numpy_helper.from_array(w, "w")], "f16_inline"), True),
        "fp16 RocketMatMulF16, external data": (save(f16, [numpy_helper.from_array(w, "w")], "f16_external",
                                                     external=True), True),
        "fp32 MatMul": (save([helper.make_node("MatMul", ["x", "w"], ["y"])],
                             [numpy_helper.from_array(w.astype(np.float32).T.copy(), "w")], "fp32"), False),
        "fp16 + Cast + MatMul (ort target)": (save(
            [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "w"], ["y"])],
            [numpy_helper.from_array(w.T.copy(), "w16")], "cast"), False),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench-weight-rss")
    ap.add_argument("--rows", type=int, default=49152)
    ap.add_argument("--cols", type=int, default=576)
    args = ap.parse_args(argv)
    from rocket_deploy.runtime.ort_custom_ops import library_path
    lib = library_path()
    res = {}
    for label, (path, needs_lib) in build(args.out, args.rows, args.cols).items():
        p = subprocess.run([sys.executable, "-c", CHILD, path, lib if needs_lib else "", str(args.cols)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{label}: {p.stderr.strip()[-400:]}")
        base, peak = (int(v) for v in p.stdout.split()[-2:])
        res[label] = {"after_imports_mb": base / 1024, "peak_mb": peak / 1024}
        print(f"{label}: peak RSS {peak / 1024:.0f} MB (after imports {base / 1024:.0f} MB)", file=sys.stderr)
    print(json.dumps({"bench": "ort_weight_rss", "weight": [args.rows, args.cols], "results": res}))


if __name__ == "__main__":
    main()
