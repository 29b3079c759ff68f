#!/usr/bin/env bash
# Fetch the TensorRT 10 C++ headers (no libraries) for header-only CI builds of the plugin.
#
# The headers ship inside the PyPI wheel kernel-lens (kernel_lens/include/tensorrt/*). We only *download* the wheel
# (`pip download --no-deps`, never install it: installing pulls triton) and unzip the headers into
# third_party/tensorrt/include (git-ignored). Idempotent: does nothing when the headers are already there.
#
# Usage: bash plugins_trt/fetch_trt_headers.sh [DEST_DIR]      (default: <repo>/third_party/tensorrt/include)
# Env:   PYTHON (default: <repo>/.venv/bin/python, else python3), KERNEL_LENS_VERSION (default 2.0.1),
#        ROCKET_TRT_HEADERS_FORCE=1 to fetch again.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DEST="${1:-$ROOT/third_party/tensorrt/include}"
VERSION="${KERNEL_LENS_VERSION:-2.0.1}"
STAMP="$DEST/.kernel-lens-$VERSION"

if [[ -z "${ROCKET_TRT_HEADERS_FORCE:-}" && -f "$STAMP" && -f "$DEST/NvInferRuntime.h" ]]; then
    echo "TensorRT headers already in $DEST"
    exit 0
fi

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading kernel-lens==$VERSION (wheel only, not installed) ..."
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "kernel-lens==$VERSION" -d "$TMP"
WHEEL="$(ls "$TMP"/kernel_lens-*.whl | head -n 1)"

# A wheel is a zip; use Python's zipfile so `unzip` need not be installed. Only kernel_lens/include/tensorrt/*.
mkdir -p "$DEST"
"$PY" - "$WHEEL" "$DEST" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "kernel_lens/include/tensorrt/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise SystemExit(f"refusing suspicious path in wheel: {name}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with z.open(info) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, out)
        n += 1
if n == 0:
    raise SystemExit(f"no {prefix}* files in {wheel}")
print(f"extracted {n} TensorRT headers to {dest}")
PYEOF
touch "$STAMP"
