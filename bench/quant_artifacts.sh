#!/usr/bin/env bash
# Build the SmolLM2-135M artifacts that bench/bench_quant_export.py measures (docs/benchmarks.md section 5).
# Calibration as in bench/bench_quantization.py (stdlib, 32 x 256 tokens), one profile per quantize setting kept
# under $OUT/profiles/profile-<q> and reused (profile once, compress many); run
#   python bench/bench_quantization.py --profile-root $OUT/profiles  first and both share the same profiles.
#   bash bench/quant_artifacts.sh [OUT]      (default OUT=out/quant)
set -euo pipefail
OUT=${1:-out/quant}
RD=${RD:-rocket-deploy}
common=(smollm2-135m --calib stdlib --calib-samples 32 --seq-len 256 --eval-samples 16 --no-safeguard --quiet --overwrite --json)
mkdir -p "$OUT/profiles"
"$RD" compress "${common[@]}" --budget 0.3 --profile-dir "$OUT/profiles/profile-fp16" --out "$OUT/rocket-0.3"
"$RD" compress "${common[@]}" --budget 0.5 --profile-dir "$OUT/profiles/profile-fp16" --out "$OUT/rocket-0.5"
"$RD" compress "${common[@]}" --method dense-quant --quantize int8 --profile-dir "$OUT/profiles/profile-int8" --out "$OUT/dense-int8"
"$RD" compress "${common[@]}" --budget 0.6 --quantize int8 --profile-dir "$OUT/profiles/profile-int8" --out "$OUT/rocket-int8-0.6"
"$RD" compress "${common[@]}" --budget 0.6 --quantize fp8 --profile-dir "$OUT/profiles/profile-fp8" --out "$OUT/rocket-fp8-0.6"
"$RD" compress "${common[@]}" --method dense-quant --quantize int4 --profile-dir "$OUT/profiles/profile-int4" --out "$OUT/dense-int4"
"$RD" compress "${common[@]}" --budget 0.76 --quantize int4 --profile-dir "$OUT/profiles/profile-int4" --out "$OUT/rocket-int4-0.76"
