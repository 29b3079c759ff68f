"""bench/gpu_check.py (`make gpu-check`) on a machine without a GPU: it must refuse at once, clearly; its report code
(targets against measurements, markdown tables) is checked on a synthetic result."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_cuda_it_fails_fast_with_one_line(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where one is installed
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=60, cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert elapsed < 5.0, f"took {elapsed:.1f} s"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "CUDA_VISIBLE_DEVICES" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not out.exists(), "nothing may be written when nothing ran"


def test_missing_out_is_a_usage_error():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "--out" in res.stderr and "Traceback" not in res.stderr


def test_report_sets_targets_against_measurements(tmp_path):
    gc = _module()

    def dec(model, batch, pct, sp_graph, sp_eager=1.0):
        return {"model": model, "proj": "q_o", "rank": 8, "keep": 4, "batch": batch, "sparse_v_ms": 0.01,
                "sparse_v_graph_ms": 0.008, "pct_copy_bw": pct, "layer_ms": 0.02, "dense_ms": 0.03,
                "speedup_eager": sp_eager, "layer_graph_ms": 0.01, "dense_graph_ms": 0.02, "speedup_graph": sp_graph}

    result = {
        "steps": {"build_extension": {"status": "ok", "seconds": 40.0},
                  "gpu_compress": {"status": "skipped", "why": "no --device", "seconds": 0.1}},
        "extension": {"device": "Fake GPU"},
        "kernel_bench": {"budget": 0.3, "dtype": "fp16", "copy_bandwidth_gbs": 4000.0,
                         "decode": [dec("llama8b", 1, 80.0, 1.5), dec("llama8b", 1, 70.0, 1.3),
                                    dec("llama8b", 1, 90.0, 1.4), dec("llama8b", 16, 10.0, 0.5),
                                    dec("smollm2", 1, 5.0, None, sp_eager=0.9)],
                         "prefill": [{"model": "smollm2", "proj": "q_o", "rank": 8, "keep": 4, "tokens": 512,
                                      "layer_ms": 0.1, "dense_ms": 0.1, "factorized_ms": 0.2,
                                      "speedup_vs_dense": 1.0, "speedup_vs_factorized": 2.0}]},
        "end_to_end": {"config": {"prompt_len": 64, "gen_len": 64}, "cuda_graphs": "not measured",
                       "models": {"dense": {"model_bytes": 2e8, "eager": {"decode_tokens_per_s": 100.0,
                                                                          "speedup_vs_dense": 1.0}},
                                  "rocket-0.3": {"model_bytes": 1.5e8, "eager": {"decode_tokens_per_s": 120.0,
                                                                                 "speedup_vs_dense": 1.2}}}},
    }
    rows = {r[0].split(" (")[0].split(",")[0]: r for r in gc.compass(result)}
    pct = rows["decode kernel % of copy bandwidth"]
    assert pct[2] == 80.0 and pct[3] is True  # median of the batch-1 Llama rows; batch 16 not counted
    llama = [r for r in gc.compass(result) if "llama8b" in r[0]][0]
    assert llama[2] == 1.4 and llama[3] is True
    smol = [r for r in gc.compass(result) if "smollm2" in r[0]][0]
    assert smol[2] == 0.9 and smol[3] is False  # no graph number: the eager one
    e2e = rows["end-to-end decode vs dense at 0.3"]
    assert e2e[2] == 1.2 and e2e[3] is False
    gc.write_markdown(tmp_path, result)
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (Fake GPU)")
    assert "| gpu_compress | skipped | 0.1 | no --device |" in md
    assert "## Targets (issue 14)" in md and "| no |" in md and "| yes |" in md
    assert "## Kernels: decode" in md and "## Kernels: prefill" in md and "## End to end" in md
