"""``rocket-deploy sweep MODEL --budgets 0.2,0.3,0.4,0.5 --out DIR``."""
from __future__ import annotations

import click

from ..config import METHODS
from ._common import echo_json_line, format_table, friendly_errors
from ._options import build_configs, calibration_options, float_list


@click.command("sweep")
@click.argument("model", default="smollm2-135m", required=False)
@click.option("--budgets", callback=float_list, default="0.2,0.3,0.4,0.5", show_default=True,
              help="Comma-separated budgets (fractions of targeted bytes to remove).")
@click.option("--out", "out", default="sweep-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for artifacts, ONNX exports, results.json and sweep.png.")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True,
              help="Runtime that measures decode speed (ort: the exported fp32 ONNX files).")
@click.option("--method", type=click.Choice([m for m in METHODS if m != "dense-quant"]), default="rocket", show_default=True)
@click.option("--prompt-len", type=click.IntRange(1), default=64, show_default=True, help="Prompt tokens of the speed runs.")
@click.option("--gen-len", type=click.IntRange(2), default=32, show_default=True, help="Generated tokens per speed run.")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Timed generations per model (interleaved).")
@click.option("--threads", type=click.IntRange(1), default=None, help="ORT intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON line.")
@calibration_options
def sweep(model, budgets, out, backend, method, prompt_len, gen_len, runs, threads, as_json, calib, calib_samples,
          sensitivity_samples, seq_len, eval_samples, seed, targets, exclude, byte_fractions, keep_ratios, objective, profile_dir, quiet):
    """Profile MODEL once, compress it at each budget, export every model (and the dense one) to ONNX, and compare
    held-out quality, file size and decode speed side by side (table, results.json, sweep.png)."""
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise click.BadParameter(f"budgets must be fractions in (0, 1), got {budgets}", param_hint="--budgets")
    with friendly_errors():
        config, cal = build_configs(budgets[0], method, calib, calib_samples, seq_len, eval_samples, seed, targets,
                                    exclude, byte_fractions, keep_ratios, objective,
                                    sensitivity_samples=sensitivity_samples)
        from ..workflows.sweep import run_sweep
        res = run_sweep(model, budgets, out, config=config, calibration=cal, backend=backend, prompt_len=prompt_len,
                        gen_len=gen_len, runs=runs, threads=threads, profile_dir=profile_dir,
                        progress=None if quiet or as_json else (lambda m: click.echo(f"[sweep] {m}", err=True)),
                        show_progress_bars=not (quiet or as_json))
    if not as_json:
        hdr = ["model", "removed", res["metric"], "ONNX MB", "x dense file", "decode ms/tok", "tok/s", "speedup"]
        rows = [[r["name"], r["removed_bytes_fraction"], r["quality"], r["file_bytes"] / 1e6, r["file_ratio_vs_dense"],
                 r["decode_ms_per_token"], r["decode_tokens_per_s"], r["speedup_vs_dense"]] for r in res["rows"]]
        click.echo(format_table(hdr, rows))
        click.echo(f"results: {out}/results.json   plot: {res['plot']}")
    echo_json_line({"model": model, "out": out, "backend": backend, "plot": res["plot"],
                    "rows": [{k: r[k] for k in ("name", "budget", "quality", "file_bytes", "decode_tokens_per_s",
                                                "speedup_vs_dense")} for r in res["rows"]]})
