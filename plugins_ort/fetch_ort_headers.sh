#!/usr/bin/env bash
# Fetch the ONNX Runtime C headers (no libraries) for building plugins_ort/rocket_ort_ops.cc.
#
# The pip onnxruntime wheel ships no headers. Debian trixie's libonnxruntime-dev (1.21) does: we download that
# package with apt-get (a private sources list and state dirs, the system's apt config untouched; no root needed)
# and extract only usr/include/onnxruntime into third_party/onnxruntime/include (git-ignored). The library asks
# ONNX Runtime for API version 17 (<= the header's ORT_API_VERSION), which newer runtimes serve.
# Idempotent. Usage: bash plugins_ort/fetch_ort_headers.sh [DEST_DIR]   Env: ROCKET_ORT_HEADERS_FORCE=1 to refetch.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DEST="${1:-$ROOT/third_party/onnxruntime/include}"
SUITE="${ROCKET_ORT_DEBIAN_SUITE:-trixie}"
MIRROR="${ROCKET_ORT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ -z "${ROCKET_ORT_HEADERS_FORCE:-}" && -f "$DEST/onnxruntime_c_api.h" ]]; then
    echo "ONNX Runtime headers already in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/lists/partial" "$TMP/cache/archives/partial"
echo "deb $MIRROR $SUITE main" > "$TMP/sources.list"
OPTS=(-o "Dir::Etc::SourceList=$TMP/sources.list" -o Dir::Etc::SourceParts=/nonexistent
      -o "Dir::State::Lists=$TMP/lists" -o "Dir::Cache=$TMP/cache" -o APT::Sandbox::User=root -qq)
echo "downloading libonnxruntime-dev ($SUITE, headers only) ..."
apt-get "${OPTS[@]}" update
(cd "$TMP" && apt-get "${OPTS[@]}" download libonnxruntime-dev)
dpkg-deb -x "$(ls "$TMP"/libonnxruntime-dev_*.deb | head -n 1)" "$TMP/x"
mkdir -p "$DEST"
cp "$TMP"/x/usr/include/onnxruntime/*.h "$DEST"/
echo "ONNX Runtime headers in $DEST"
