"""Options shared by the commands that calibrate (compress, sweep) and their translation into configs."""
from __future__ import annotations

import click

from ..config import OBJECTIVES


def float_list(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}")


def calibration_options(f):
    """Options shared by commands that calibrate (compress, sweep)."""
    opts = [
        click.option("--calib", "calib", multiple=True, metavar="SOURCE",
                     help="Calibration text: a .txt / .jsonl file, or a built-in source (stdlib, pyref, licenses, "
                          "pkgdocs, selfgen = sampled from the model). Repeat to mix; given sources replace the "
                          "default mix stdlib+pyref+licenses+selfgen."),
        click.option("--calib-samples", default=64, show_default=True, type=click.IntRange(1), help="Calibration sequences."),
        click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8), help="Tokens per sequence."),
        click.option("--sensitivity-samples", default=32, show_default=True, type=click.IntRange(1),
                     help="Calibration sequences of the sensitivity (backward) pass, evenly spread over the sources "
                          "(all of them when fewer). It steers the allocation only: 32 allocate as well as 64 "
                          "(docs/benchmarks.md) in half the time."),
        click.option("--eval-samples", default=16, show_default=True, type=click.IntRange(1), help="Held-out sequences."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the document split."),
        click.option("--targets", multiple=True, metavar="REGEX", help="Layer-name patterns to compress (default: attention and MLP projections)."),
        click.option("--exclude", multiple=True, metavar="REGEX", help="Layer-name patterns to leave dense."),
        click.option("--byte-fractions", callback=float_list, default=None, help="Profiled byte fractions, e.g. 0.2,0.4,0.6,0.8."),
        click.option("--keep-ratios", callback=float_list, default=None, help="Profiled keep-per-column ratios k/r, e.g. 1,0.5."),
        click.option("--objective", type=click.Choice(OBJECTIVES),
                     default=None, help="Per-layer error the knapsack minimises (default auto: fisher for causal LMs)."),
        click.option("--profile-dir", type=click.Path(file_okay=False), default=None,
                     help="Keep the profile here and reuse it on later runs with the same calibration."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_configs(budget, method, calib, calib_samples, seq_len, eval_samples, seed, targets, exclude,
                  byte_fractions, keep_ratios, objective, quantize=None, sensitivity_samples=32):
    from ..config import CalibrationConfig, RocketConfig
    kw = {"budget": budget, "method": method, "quantize": quantize}      # validated together: dense-quant needs quantize
    if targets:
        kw["targets"] = targets
    if exclude:
        kw["exclude"] = exclude
    if byte_fractions:
        kw["byte_fractions"] = byte_fractions
    if keep_ratios:
        kw["keep_ratios"] = keep_ratios
    if objective:
        kw["objective"] = objective
    from ..config import DEFAULT_SOURCES
    cal = CalibrationConfig(sources=calib or DEFAULT_SOURCES, samples=calib_samples, seq_len=seq_len,
                            eval_samples=eval_samples, seed=seed, sensitivity_samples=sensitivity_samples)
    return RocketConfig(**kw), cal


def trust_remote_code_option(f):
    """``--trust-remote-code``: let a model / artifact folder's own Python code (config ``auto_map``) run."""
    return click.option("--trust-remote-code", is_flag=True,
                        help="Run Python code shipped inside the model or artifact folder (config.json auto_map). "
                             "This executes that code with your permissions: use it only for folders you trust. "
                             "Off by default: such code is never run.")(f)


def no_verify_option(f):
    """``--no-verify``: skip the SHA-256 check of the artifact's files on load."""
    return click.option("--no-verify", is_flag=True,
                        help="Skip checking the artifact's files against the SHA-256 recorded in rocket.json "
                             "(faster for very large artifacts; damage then goes unnoticed).")(f)
