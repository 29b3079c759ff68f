"""One prepared GPU check (`make gpu-check`, docs/plugin.md): everything the CUDA code needs proven on a device.

Steps, in order, each recorded with its status (ok / failed / skipped + why) and seconds:

1. build the torch extension of the sparse V kernels (rocket_deploy.runtime.kernel_ext);
2. the `gpu`-marked tests (pytest -m gpu: kernels vs float64 references on both paths, RocketLinear on CUDA, ...);
3. the kernel benchmark (bench/bench_kernels.py): decode at batch 1 / 4 / 16 and prefill at 512 / 2048 tokens for
   SmolLM2-135M and Llama-3-8B layer shapes, keep 1/2 and 1/3, vs cuBLAS dense fp16 and vs copy bandwidth;
4. GPU compress time of SmolLM2 at budget 0.3 (`rocket-deploy compress --device cuda`; skipped, with the reason,
   when the CLI has no --device);
5. end-to-end SmolLM2 decode tokens/s (torch backend, fp16, batch 1) at budgets 0.2 / 0.3 / 0.4 / 0.5 vs dense,
   three ways: eager (dynamic KV cache), static KV cache without graphs, and each decode step replayed from a CUDA
   graph (``TorchEngine(cuda_graphs=True)``), with the graph counters (captures / replays / why off) per model and
   whether 32 greedy tokens equal the eager ones. The compressed models are made quickly:
   every default target projection becomes a RocketLinear of the size the budget gives (truncated SVD, largest-|V|
   entries kept, k/r = 1/2) -- the same kernels and bytes as a compressed artifact, not its accuracy; plus the real
   artifact of step 4 when there is one.

Writes <out>/gpu_check.json (everything measured), <out>/gpu_check.md (tables, the issue's targets against the
numbers) and <out>/gpu_tests.log. Without a usable CUDA device it fails at once (one line, exit status 2); exit
status 1 when a step failed. The whole run is sized for 10 minutes on one H200 (--time-budget).

    python bench/gpu_check.py --out out/gpu-check [--time-budget 540] [--skip-tests] [--skip-compress]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.2, 0.3, 0.4, 0.5)
TARGETS = {"decode_pct_copy_bw": 75.0, "layer_speedup_batch1": 1.25, "e2e_speedup_0.3": 1.4}


def cuda_problem() -> str | None:
    """Why this machine cannot run the check (None: it can). Cheap tests first, so that a CPU box answers at once."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
    if sys.platform.startswith("linux") and not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg")):
        return "no NVIDIA GPU device (/dev/nvidia*) on this machine"
    import torch
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (torch.cuda.is_available() is False: driver / CUDA_VISIBLE_DEVICES)"
    return None


class Check:
    """Step bookkeeping against a time budget."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.t0, self.budget_s = out, time.monotonic(), budget_s
        self.result = {"steps": {}, "targets": TARGETS}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, fn, min_left: float = 30.0):
        if self.left() < min_left:
            self.result["steps"][name] = {"status": "skipped", "why": f"time budget: {self.left():.0f} s left"}
            return None
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            value = fn()
            status = {"status": "ok"}
        except SkipStep as e:
            value, status = None, {"status": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001 -- record the failure and go on with the other steps
            value, status = None, {"status": "failed", "why": f"{type(e).__name__}: {str(e)[-1500:]}"}
        status["seconds"] = round(time.monotonic() - t, 2)
        self.result["steps"][name] = status
        print(f"gpu-check: {name}: {status['status']} ({status['seconds']} s)"
              + (f": {status['why'][:200]}" if "why" in status else ""), file=sys.stderr, flush=True)
        self.save()
        return value

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1, default=str))


class SkipStep(Exception):
    pass


# ---- steps ----------------------------------------------------------------------------------------------------------
def build_extension() -> dict:
    import torch
    from rocket_deploy.runtime import kernel_ext
    kernel_ext.load_extension()
    return {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": kernel_ext.find_nvcc()}


def gpu_tests(out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "gpu_tests.log").write_text(res.stdout + res.stderr)
    tail = (res.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    if res.returncode not in (0, 5):
        raise RuntimeError(f"pytest -m gpu: {tail} (see gpu_tests.log)")
    return {"summary": tail, **counts}


def kernel_bench(iters: int) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_kernels
    return bench_kernels.run(iters=iters, repeats=5)


def gpu_compress(out: Path, timeout: float) -> dict:
    cli = [sys.executable, "-m", "rocket_deploy.cli"]
    help_text = subprocess.run(cli + ["compress", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    if "--device" not in help_text:
        raise SkipStep("`rocket-deploy compress` has no --device option in this checkout: GPU compress not measured")
    art = out / "smollm2-0.3-gpu"
    cmd = cli + ["compress", "smollm2-135m", "--budget", "0.3", "--device", "cuda", "--out", str(art), "--overwrite",
                 "--quiet", "--json"]
    t = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    secs = time.monotonic() - t
    if res.returncode != 0:
        raise RuntimeError(f"compress --device cuda failed: {res.stderr.strip()[-1000:]}")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return {"wall_s": secs, "artifact": str(art), "summary": summary}


def _svd_rocket(linear, svd, budget: float, keep_frac: float = 0.5):
    """A RocketLinear of `linear`'s shape at `budget` (fraction of its fp16 bytes removed) from the truncated SVD
    `svd` = (U, S, Vh) of its weight^T, the largest |V| entries of each column kept."""
    import torch
    from rocket_deploy.rocket_linear import RocketLinear
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_kernels import rank_keep_for_budget
    uu, s, vh = svd
    d_in, d_out = uu.shape[0], vh.shape[1]
    r, k = rank_keep_for_budget(d_in, d_out, budget, keep_frac)
    r = min(r, d_in, d_out)
    k = min(k, r)
    u = uu[:, :r] * s[:r].sqrt()
    v = s[:r, None].sqrt() * vh[:r]
    keep = torch.zeros_like(v, dtype=torch.bool)
    keep.scatter_(0, v.abs().topk(k, dim=0).indices, True)
    bias = linear.bias.detach() if linear.bias is not None else None
    return RocketLinear.from_factors(u, v * keep, keep, bias=bias, dtype=linear.weight.dtype).to(linear.weight.device)


def end_to_end(compressed: dict | None, prompt_len: int, gen_len: int, runs: int, device: str = "cuda",
               dtype_name: str = "fp16", budgets=BUDGETS) -> dict:
    """Decode tokens/s of dense vs the budget models (see the module doc); a CPU `device` (fp32): a dry run."""
    import copy
    import inspect

    import torch
    from rocket_deploy.artifact import load_artifact
    from rocket_deploy.config import DEFAULT_TARGETS
    from rocket_deploy.models import load_model
    from rocket_deploy.runtime.bench import BenchConfig, bench_side_by_side, greedy_tokens
    from rocket_deploy.runtime.torch_backend import TorchEngine
    from rocket_deploy.targets import select_targets, set_module

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    lm = load_model("smollm2-135m", dtype=dtype)
    dense = lm.model.to(device).eval()
    models = {"dense": dense}
    svds = {name: torch.linalg.svd(lin.weight.detach().float().t(), full_matrices=False)
            for name, lin in select_targets(dense, DEFAULT_TARGETS).items()}
    for b in budgets:
        m = copy.deepcopy(dense)
        for name, lin in select_targets(m, DEFAULT_TARGETS).items():
            set_module(m, name, _svd_rocket(lin, svds[name], b))
        models[f"rocket-{b}"] = m
    del svds
    if compressed:
        art, _, _ = load_artifact(compressed["artifact"], dtype=dtype, device=device)
        models["artifact-0.3-gpu"] = art
    params = inspect.signature(TorchEngine.__init__).parameters
    graph_arg = "cuda_graphs" if "cuda_graphs" in params else None
    # eager: the dynamic cache, every kernel launched from Python (what ran before CUDA graphs); static-kv: the static
    # cache without graphs (its own cost); cuda-graphs: the static cache with each decode step replayed from a graph
    variants = [("eager", {graph_arg: False} if graph_arg else {})]
    if graph_arg:
        variants += [("static-kv", {"cuda_graphs": False, "static_kv": True}), ("cuda-graphs", {"cuda_graphs": True})]
    cfg = BenchConfig(batches=(1,), prompt_len=prompt_len, gen_len=gen_len, warmup=1, runs=runs)
    result = {"config": {"prompt_len": prompt_len, "gen_len": gen_len, "runs": runs, "dtype": dtype_name, "batch": 1,
                         "device": device},
              "cuda_graphs": ("eager (dynamic KV) / static-kv / cuda-graphs" if graph_arg else
                              "not measured: TorchEngine has no CUDA-graph switch in this checkout"),
              "models": {}}
    tokens = {}
    for label, kw in variants:
        engines = {n: TorchEngine(m, lm.tokenizer, device=device, **kw) for n, m in models.items()}
        res = bench_side_by_side(engines, cfg)
        base = res["dense"]["rows"][0]["decode_tokens_per_s"]
        for n, r in res.items():
            row = r["rows"][0]
            result["models"].setdefault(n, {"model_bytes": r["model_bytes"]})[label] = {
                "decode_tokens_per_s": row["decode_tokens_per_s"], "decode_ms_per_step": row["decode_ms_per_step"],
                "prefill_ms": row["prefill_ms_median"],
                "speedup_vs_dense": row["decode_tokens_per_s"] / base if base else None,
                **({"graph_stats": engines[n].graph_stats} if hasattr(engines[n], "graph_stats") else {})}
        # greedy tokens of the same prompt through each variant (fp16: the graphs must not change them)
        prompt = list(range(10, 10 + prompt_len))
        tokens[label] = {n: greedy_tokens(e, prompt, 32) for n, e in engines.items()}
        del engines
    if "cuda-graphs" in tokens:
        result["greedy_32_equal_to_eager"] = {n: tokens["cuda-graphs"][n] == t for n, t in tokens["eager"].items()}
        for n, m in result["models"].items():
            e, g = m.get("eager", {}), m.get("cuda-graphs", {})
            if e.get("decode_tokens_per_s") and g.get("decode_tokens_per_s"):
                m["graphs_speedup_vs_eager"] = g["decode_tokens_per_s"] / e["decode_tokens_per_s"]
    result["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None
    return result


# ---- report ---------------------------------------------------------------------------------------------------------
def _md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(c):
        if c is None:
            return "-"
        if isinstance(c, float):
            return f"{c:.3g}" if abs(c) < 1e4 else f"{c:.0f}"
        return str(c)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def compass(result: dict) -> list[list]:
    """The issue's targets against the measured numbers: [what, target, measured, met]."""
    rows = []
    kb = result.get("kernel_bench")
    if kb:
        big = [r for r in kb["decode"] if r["model"] == "llama8b" and r["batch"] == 1]
        pct = _median(r["pct_copy_bw"] for r in big)
        rows.append(["decode kernel % of copy bandwidth (Llama-8B shapes, batch 1, median)",
                     f">= {TARGETS['decode_pct_copy_bw']:.0f}", pct,
                     None if pct is None else pct >= TARGETS["decode_pct_copy_bw"]])
        for model in ("smollm2", "llama8b"):
            b1 = [r for r in kb["decode"] if r["model"] == model and r["batch"] == 1]
            sp = _median(r["speedup_graph"] if r["speedup_graph"] is not None else r["speedup_eager"] for r in b1)
            rows.append([f"budget-{kb['budget']} layer vs cuBLAS dense, batch 1, {model} (median, graph)",
                         f">= {TARGETS['layer_speedup_batch1']}x", sp,
                         None if sp is None else sp >= TARGETS["layer_speedup_batch1"]])
    e2e = result.get("end_to_end")
    if e2e:
        r = e2e["models"].get("rocket-0.3", {})
        best = max((v.get("speedup_vs_dense") or 0 for k, v in r.items() if isinstance(v, dict)), default=None)
        rows.append(["end-to-end decode vs dense at 0.3 (SmolLM2, batch 1)", f">= {TARGETS['e2e_speedup_0.3']}x",
                     best, None if best is None else best >= TARGETS["e2e_speedup_0.3"]])
    return rows


def write_markdown(out: Path, result: dict) -> None:
    parts = [f"# GPU check ({result.get('extension', {}).get('device', '?')})", ""]
    parts.append(_md_table(["step", "status", "seconds", "note"],
                           [[n, s["status"], s.get("seconds"), s.get("why", "")[:160]]
                            for n, s in result["steps"].items()]))
    rows = compass(result)
    if rows:
        parts += ["", "## Targets (issue 14)", "",
                  _md_table(["what", "target", "measured", "met"],
                            [[w, t, m, "-" if ok is None else ("yes" if ok else "no")] for w, t, m, ok in rows])]
    kb = result.get("kernel_bench")
    if kb:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_kernels import tables
        dh, drows, ph, prows = tables(kb)
        parts += ["", f"## Kernels: decode (budget {kb['budget']}, {kb['dtype']}, copy bandwidth "
                      f"{kb['copy_bandwidth_gbs']:.0f} GB/s)", "", _md_table(dh, drows),
                  "", "## Kernels: prefill", "", _md_table(ph, prows)]
    e2e = result.get("end_to_end")
    if e2e:
        labels = sorted({k for m in e2e["models"].values() for k, v in m.items() if isinstance(v, dict)})
        graphs = any("graphs_speedup_vs_eager" in m for m in e2e["models"].values())
        head = (["model", "MB"] + [f"{lab} tok/s" for lab in labels] + [f"{lab} x dense" for lab in labels]
                + (["graphs x eager", "captures / replays", "greedy = eager"] if graphs else []))
        same = e2e.get("greedy_32_equal_to_eager", {})

        def graph_cols(n, m):
            st = m.get("cuda-graphs", {}).get("graph_stats") or {}
            counts = f"{st.get('captures')} / {st.get('replays')}" + (f" (off: {st['cuda_graphs']})"
                                                                     if st.get("cuda_graphs") else "")
            return [m.get("graphs_speedup_vs_eager"), counts, same.get(n)]
        rows = [[n, m["model_bytes"] / 1e6] + [m.get(lab, {}).get("decode_tokens_per_s") for lab in labels]
                + [m.get(lab, {}).get("speedup_vs_dense") for lab in labels]
                + (graph_cols(n, m) if graphs else []) for n, m in e2e["models"].items()]
        parts += ["", f"## End to end: SmolLM2-135M decode, torch {e2e['config'].get('dtype', 'fp16')}, batch 1, "
                      f"prompt {e2e['config']['prompt_len']}, "
                      f"{e2e['config']['gen_len']} tokens (CUDA graphs: {e2e['cuda_graphs']})", "",
                  _md_table(head, rows)]
    comp = result.get("gpu_compress")
    if comp:
        parts += ["", f"## GPU compress: SmolLM2-135M at 0.3 in {comp['wall_s']:.1f} s (wall, CLI)"]
    (out / "gpu_check.md").write_text("\n".join(parts) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json / .md / gpu_tests.log")
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole check (default 540)")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest -m gpu step")
    ap.add_argument("--skip-compress", action="store_true", help="skip the GPU compress step")
    ap.add_argument("--iters", type=int, default=50, help="kernel benchmark: calls per timing")
    ap.add_argument("--gen-len", type=int, default=64, help="end to end: generated tokens per run")
    args = ap.parse_args(argv)
    problem = cuda_problem()
    if problem is not None:
        print(f"gpu-check: needs a CUDA GPU: {problem}; nothing was run", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    chk = Check(out, args.time_budget)
    r = chk.result
    r["extension"] = chk.step("build_extension", build_extension, min_left=0)
    if r["extension"] is None:
        write_markdown(out, r)
        return 1
    if args.skip_tests:
        r["steps"]["gpu_tests"] = {"status": "skipped", "why": "--skip-tests"}
    else:
        r["gpu_tests"] = chk.step("gpu_tests", lambda: gpu_tests(out, max(60.0, min(240.0, chk.left() - 240))))
    r["kernel_bench"] = chk.step("kernel_bench", lambda: kernel_bench(args.iters if chk.left() > 200 else 10))
    if args.skip_compress:
        r["steps"]["gpu_compress"] = {"status": "skipped", "why": "--skip-compress"}
    else:
        r["gpu_compress"] = chk.step("gpu_compress", lambda: gpu_compress(out, max(30.0, chk.left() - 120)), 90)
    r["end_to_end"] = chk.step("end_to_end", lambda: end_to_end(r.get("gpu_compress"), 64, args.gen_len, 3), 45)
    r["total_seconds"] = round(time.monotonic() - chk.t0, 1)
    chk.save()
    write_markdown(out, r)
    failed = [n for n, s in r["steps"].items() if s["status"] == "failed"]
    print(f"gpu-check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
