"""``rocket-deploy compress MODEL --budget 0.3 --out DIR``."""
from __future__ import annotations

import os

import click

from ._common import echo_json_line, format_table, friendly_errors


def _floats(ctx, param, value):
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
        click.option("--eval-samples", default=16, show_default=True, type=click.IntRange(1), help="Held-out sequences."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the document split."),
        click.option("--targets", multiple=True, metavar="REGEX", help="Layer-name patterns to compress (default: attention and MLP projections)."),
        click.option("--exclude", multiple=True, metavar="REGEX", help="Layer-name patterns to leave dense."),
        click.option("--byte-fractions", callback=_floats, default=None, help="Profiled byte fractions, e.g. 0.2,0.4,0.6,0.8."),
        click.option("--keep-ratios", callback=_floats, default=None, help="Profiled keep-per-column ratios k/r, e.g. 1,0.5."),
        click.option("--objective", type=click.Choice(["auto", "fisher", "rel-original", "rel-whitened", "whitened-energy"]),
                     default=None, help="Per-layer error the knapsack minimises (default auto: fisher for causal LMs)."),
        click.option("--profile-dir", type=click.Path(file_okay=False), default=None,
                     help="Keep the profile here and reuse it on later runs with the same calibration."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_configs(budget, method, calib, calib_samples, seq_len, eval_samples, seed, targets, exclude,
                  byte_fractions, keep_ratios, objective, quantize=None):
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
                            eval_samples=eval_samples, seed=seed)
    return RocketConfig(**kw), cal


def get_profile(model, tokenizer, config, cal, data, profile_dir, quiet):
    """Reuse the profile in ``profile_dir`` when it matches this calibration and grid, else profile anew."""
    from ..compress.pipeline import run_profile
    from ..compress.profile import Profile
    if profile_dir and os.path.isfile(os.path.join(profile_dir, "profile.json")):
        prof = Profile.load(profile_dir)
        same_data = prof.calibration.get("calib_sha256_16") == data.info["calib_sha256_16"]
        same_grid = prof.grid.get("byte_fractions") == list(config.byte_fractions) and \
            prof.grid.get("keep_ratios") == list(config.keep_ratios) and \
            prof.grid.get("quantize") == config.quantize and \
            prof.grid.get("gram_damping", 0.0) == config.gram_damping and \
            prof.grid.get("quant_group_size", config.quant_group_size) == config.quant_group_size
        if same_data and same_grid:
            if not quiet:
                click.echo(f"reusing profile in {profile_dir}", err=True)
            return prof
        if not quiet:
            click.echo(f"profile in {profile_dir} was made with other calibration or grid; profiling again", err=True)
    return run_profile(model, tokenizer, config, cal, data=data, cache_dir=profile_dir, progress=not quiet)


@click.command("compress")
@click.argument("model", default="smollm2-135m", required=False)
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3, show_default=True,
              help="Fraction of the targeted layers' fp16 bytes to remove (0 < budget < 1).")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--method", type=click.Choice(["rocket", "rocket-uniform", "svd-llm", "dense-quant"]), default="rocket",
              show_default=True, help="dense-quant: no ROCKET, the dense weights quantized with --quantize (baseline).")
@click.option("--quantize", type=click.Choice(["int8", "fp8", "int4"]), default=None,
              help="Quantize the factors (U per rank component, V per output column; int4: U group-wise, V int8); "
                   "the budget then counts quantized bytes. See docs/quantization.md.")
@click.option("--safeguard/--no-safeguard", default=True, show_default=True,
              help="Also build the uniform allocation at the same bytes and keep it if it has lower held-out "
                   "perplexity (costs one extra model build and evaluation).")
@click.option("--gram-damping", type=click.FloatRange(0, 10), default=None,
              help="Add this fraction of the mean activation energy to the Gram's diagonal before whitening "
                   "(default: the config's; see docs/benchmarks.md section 2).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary JSON line.")
@calibration_options
def compress(model, budget, out, method, quantize, safeguard, gram_damping, overwrite, as_json, calib, calib_samples,
             seq_len, eval_samples, seed, targets, exclude, byte_fractions, keep_ratios, objective, profile_dir, quiet):
    """Compress MODEL (a Hugging Face directory, a .gguf file, or smollm2-135m) into an artifact at --out."""
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} already exists; choose another --out or pass --overwrite")
    with friendly_errors():
        config, cal = build_configs(budget, method, calib, calib_samples, seq_len, eval_samples, seed, targets,
                                    exclude, byte_fractions, keep_ratios, objective, quantize)
        config = config.replace(safeguard=safeguard)
        if gram_damping is not None:
            config = config.replace(gram_damping=gram_damping)
        from ..compress.pipeline import compress as run_compress, prepare_calibration
        from ..models import load_model
        from ..targets import select_targets
        lm = load_model(model)
        select_targets(lm.model, config.targets, config.exclude)     # fail fast on bad patterns
        data = prepare_calibration(lm.tokenizer, cal, lm.model)
        prof = get_profile(lm.model, lm.tokenizer, config, cal, data, profile_dir, quiet)
        try:
            res = run_compress(lm.model, lm.tokenizer, config, cal, out=out, overwrite=overwrite, profile=prof,
                               data=data, inplace=True, progress=not quiet, source=lm.source)
        finally:
            if profile_dir is None:
                import shutil
                shutil.rmtree(prof.cache_dir, ignore_errors=True)
    b = res.manifest["budget"]
    summary = {"out": res.path, "method": method, **({"quantize": quantize} if quantize else {}), "target_removed": budget,
               "removed_bytes_fraction": round(b["removed_bytes_fraction"], 4),
               "compressed_bytes": b["compressed_bytes"], "dense_bytes": b["dense_bytes"],
               "params_ratio": round(b["params_ratio"], 4), "layers_compressed": b["layers_compressed"],
               "layers_dense": b["layers_dense"], "seconds": res.manifest["timings_s"]}
    if not as_json:
        rows = [[k, v] for k, v in summary.items() if k != "seconds"]
        click.echo(format_table(["field", "value"], rows))
    echo_json_line(summary)
