"""Budget sweep: profile once, compress at several budgets, export each (ort target, fp32), and compare with the
dense model (also exported) in one run: held-out perplexity (torch), ONNX file size, decode latency / tokens per
second (ONNX Runtime, interleaved runs). Writes ``results.json`` and ``sweep.png`` to the output directory.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence



def _log(progress, msg):
    if progress:
        progress(msg)


def run_sweep(model_spec: str, budgets: Sequence[float], out_dir: str, *, config=None, calibration=None,
              backend: str = "ort", prompt_len: int = 64, gen_len: int = 32, runs: int = 3, warmup: int = 1,
              threads: int | None = None, keep_artifacts: bool = True, progress: Callable[[str], None] | None = None,
              profile_dir: str | None = None, show_progress_bars: bool = False) -> dict[str, Any]:
    """Run the sweep (see module doc). ``config`` is a :class:`RocketConfig` template (its budget is replaced)."""
    from rocket_deploy.compress.pipeline import compress, load_or_profile, prepare_calibration
    from rocket_deploy.config import CalibrationConfig, RocketConfig
    from rocket_deploy.export import export_model
    from rocket_deploy.models import is_causal_lm, load_model
    from rocket_deploy.perplexity import hidden_state_fidelity, perplexity
    from rocket_deploy.runtime.backends import open_backend
    from rocket_deploy.runtime.bench import BenchConfig, bench_side_by_side
    budgets = sorted(float(b) for b in budgets)
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1), got {budgets}")
    if backend not in ("ort", "torch"):
        raise ValueError(f"sweep measures speed with ort or torch, got {backend!r}")
    config = config or RocketConfig()
    calibration = calibration or CalibrationConfig()
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    lm = load_model(model_spec)
    model, tok = lm.model, lm.tokenizer
    causal = is_causal_lm(model)
    _log(progress, "calibration text")
    data = prepare_calibration(tok, calibration, model)
    _log(progress, "profile (once for all budgets)")
    prof = load_or_profile(model, tok, config, calibration, data, profile_dir, progress=show_progress_bars,
                           log=progress)
    held = data.heldout.ids

    def quality(m):
        return perplexity(m, held) if causal else hidden_state_fidelity(m, model, held)["rel_l2"]

    entries: list[dict[str, Any]] = []
    _log(progress, "dense: quality and export")
    dense_dir = os.path.join(out_dir, "dense-onnx")
    dres = export_model(model, dense_dir, target="ort", dtype="fp32", tokenizer=tok, overwrite=True)
    entries.append({"name": "dense", "budget": 0.0, "quality": quality(model), "onnx": dres.path,
                    "file_bytes": dres.file_bytes, "validation_passed": dres.validation["passed"],
                    "removed_bytes_fraction": 0.0, "model": model})
    for b in budgets:
        _log(progress, f"budget {b}: compress, quality, export")
        art = os.path.join(out_dir, f"rocket-{b:g}") if keep_artifacts else None
        res = compress(model, tok, config.replace(budget=b), calibration, out=art, overwrite=True, profile=prof,
                       data=data, progress=show_progress_bars, source=lm.source)
        ores = export_model(res.model, os.path.join(out_dir, f"rocket-{b:g}-onnx"), target="ort", dtype="fp32",
                            tokenizer=tok, overwrite=True, extra_info={"budget": b})
        entries.append({"name": f"rocket-{b:g}", "budget": b, "quality": quality(res.model), "onnx": ores.path,
                        "artifact": res.path, "file_bytes": ores.file_bytes,
                        "validation_passed": ores.validation["passed"],
                        "removed_bytes_fraction": res.manifest["budget"]["removed_bytes_fraction"],
                        "model": res.model})
    _log(progress, f"speed ({backend}, interleaved runs)")
    engines = {}
    for e in entries:
        if backend == "ort":
            engines[e["name"]] = open_backend(e["onnx"], "ort", threads=threads, tokenizer=tok)
        else:   # the in-memory model (no artifact is written when keep_artifacts is False)
            from rocket_deploy.runtime.torch_backend import TorchEngine
            engines[e["name"]] = TorchEngine(e["model"], tok, device="cpu")
    cfg = BenchConfig(batches=(1,), prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, runs=runs)
    speed = bench_side_by_side(engines, cfg)
    dense_row = speed["dense"]["rows"][0]
    rows = []
    for e in entries:
        e.pop("model")
        r = speed[e["name"]]["rows"][0]
        e.update(decode_ms_per_token=r["decode_ms_per_step"], decode_tokens_per_s=r["decode_tokens_per_s"],
                 prefill_ms=r["prefill_ms_median"], latency_ms_median=r["latency_ms_median"],
                 file_ratio_vs_dense=e["file_bytes"] / entries[0]["file_bytes"],
                 speedup_vs_dense=(r["decode_tokens_per_s"] / dense_row["decode_tokens_per_s"])
                 if r["decode_tokens_per_s"] and dense_row["decode_tokens_per_s"] else None)
        rows.append(e)
    result = {"model": model_spec, "backend": backend, "metric": "perplexity" if causal else "hidden-state rel. L2",
              "heldout_tokens": int(held.numel()), "bench": cfg.__dict__ | {"batches": list(cfg.batches)},
              "profile_seconds": round(prof.seconds, 1), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    result["plot"] = plot_sweep(result, os.path.join(out_dir, "sweep.png"))
    return result


def plot_sweep(result: dict[str, Any], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["name"] != "dense"]
    dense = next(r for r in result["rows"] if r["name"] == "dense")
    xs = [r["budget"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [r["decode_ms_per_token"] for r in rows], "o-", label="ROCKET")
    a1.axhline(dense["decode_ms_per_token"], color="gray", ls="--", label="dense")
    a1.set_xlabel("budget (fraction of targeted bytes removed)")
    a1.set_ylabel(f"decode ms / token ({result['backend']}, batch 1)")
    a1.legend()
    a2.plot(xs, [r["quality"] for r in rows], "o-", color="C1", label="ROCKET")
    a2.axhline(dense["quality"], color="gray", ls="--", label="dense")
    a2.set_xlabel("budget (fraction of targeted bytes removed)")
    a2.set_ylabel(f"held-out {result['metric']}")
    a2.legend()
    fig.suptitle(f"{result['model']}: latency and quality against budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
