"""The ONNX Runtime CPU custom-op library for ``rocket.RocketSparseVMatMul`` and ``rocket.RocketMatMulF16``: locate,
build, register.

The C++ source is ``plugins_ort/rocket_ort_ops.cc``: the packed bitmask product (V kept packed in memory) and the
fp32 x fp16-weight product of the ``ort-packed`` target (weights kept fp16 in memory); AVX2+FMA+F16C or scalar,
chosen at run time. It is compiled once with ``g++ -O3 -shared -fPIC`` against the ONNX Runtime C
headers (no link to libonnxruntime: the library takes the API from ``RegisterCustomOps``) into
``$ROCKET_ORT_OPS_DIR`` (default ``~/.cache/rocket_deploy/ort_ops/<hash of the source>``). Headers are looked for
in ``$ROCKET_ORT_INCLUDE``, then ``third_party/onnxruntime/include`` (``make ort-headers``). A prebuilt library can
be named with ``$ROCKET_ORT_OPS_LIB``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from rocket_deploy.onnx_contract import ORT_LIBRARY_OPS, PLUGIN_DOMAINS

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(_ROOT, "plugins_ort", "rocket_ort_ops.cc")
HEADER = "onnxruntime_c_api.h"
LIB_NAME = "librocket_ort_ops.so"


class OrtOpsUnavailable(RuntimeError):
    """The graph needs the custom-op library and it cannot be found or built."""


def include_dir() -> str | None:
    for d in (os.environ.get("ROCKET_ORT_INCLUDE"), os.path.join(_ROOT, "third_party", "onnxruntime", "include")):
        if d and os.path.isfile(os.path.join(d, HEADER)):
            return d
    return None


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build_problem() -> str | None:
    """Why the library cannot be built here (None when it can)."""
    if os.environ.get("ROCKET_ORT_OPS_LIB"):
        return None
    if not os.path.isfile(SOURCE):
        return f"the custom-op source {SOURCE} is missing"
    if include_dir() is None:
        return "ONNX Runtime C headers not found: run `make ort-headers` (or set ROCKET_ORT_INCLUDE)"
    if compiler() is None:
        return "no C++ compiler (g++) to build the ONNX Runtime custom-op library"
    return None


def library_path(build: bool = True) -> str:
    """Path of the built library (building it first when needed). Raises :class:`OrtOpsUnavailable`."""
    env = os.environ.get("ROCKET_ORT_OPS_LIB")
    if env:
        if not os.path.isfile(env):
            raise OrtOpsUnavailable(f"ROCKET_ORT_OPS_LIB={env!r} does not exist; unset it or build with `make ort-ops`")
        return env
    problem = build_problem()
    if problem:
        raise OrtOpsUnavailable(f"graph uses {'/'.join(ORT_LIBRARY_OPS)}, which needs the ONNX Runtime custom-op library: {problem}")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    base = os.environ.get("ROCKET_ORT_OPS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rocket_deploy",
                                                                 "ort_ops")
    out = os.path.join(base, key, LIB_NAME)
    if os.path.isfile(out) or not build:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [compiler(), "-O3", "-std=c++17", "-shared", "-fPIC", "-I", include_dir(), SOURCE, "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise OrtOpsUnavailable(f"building the ONNX Runtime custom-op library failed: {proc.stderr.strip()[-400:]}")
    os.replace(tmp, out)       # atomic: concurrent builders never see a half-written library
    return out


def graph_uses_op(path: str) -> bool:
    """Whether the ONNX file holds a node of the library (``RocketSparseVMatMul`` / ``RocketMatMulF16``, in any plugin
    domain); weights are not read."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        for n in g.node:
            if n.op_type in ORT_LIBRARY_OPS and n.domain in PLUGIN_DOMAINS:
                return True
            graphs.extend(a.g for a in n.attribute if a.HasField("g"))
    return False


def register(session_options) -> str:
    """Register the library on an ``onnxruntime.SessionOptions``; returns its path."""
    lib = library_path()
    session_options.register_custom_ops_library(lib)
    return lib
