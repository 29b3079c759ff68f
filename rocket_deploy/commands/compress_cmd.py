"""``rocket-deploy compress MODEL --budget 0.3 --out DIR``."""
from __future__ import annotations

import os
import time

import click

from ..config import METHODS, QUANT_METHODS, QUANT_SCHEMES
from ..report import seconds_table
from ._common import echo_json_line, format_table, friendly_errors
from ._options import build_configs, calibration_options, trust_remote_code_option


class DeviceType(click.ParamType):
    """``cpu``, ``cuda`` or ``cuda:N``, checked when parsed (before the model loads): a usage error naming the fix."""
    name = "device"

    def convert(self, value, param, ctx):
        from ..devices import DeviceError, resolve_device
        try:
            return str(resolve_device(value))
        except DeviceError as e:
            self.fail(str(e), param, ctx)


@click.command("compress")
@click.argument("model", default="smollm2-135m", required=False)
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3, show_default=True,
              help="Fraction of the targeted layers' fp16 bytes to remove (0 < budget < 1).")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to write.")
@click.option("--method", type=click.Choice(METHODS), default="rocket",
              show_default=True, help="dense-quant: no ROCKET, the dense weights quantized with --quantize (baseline).")
@click.option("--quantize", type=click.Choice(QUANT_SCHEMES), default=None,
              help="Quantize the factors (U per rank component, V per output column; int4: U group-wise, V 4-bit); "
                   "the budget then counts quantized bytes. See docs/quantization.md.")
@click.option("--quant-method", type=click.Choice(QUANT_METHODS), default=None,
              help="How quantized weights are rounded: rtn (nearest, whitened clip search) or gptq (error feedback "
                   "with the calibration Gram) -- for dense weights and U (default: the config's).")
@click.option("--quant-v-refit/--no-quant-v-refit", default=None,
              help="Refit V's kept values to the quantized U (default: the config's).")
@click.option("--quant-v-bits", type=click.Choice(["8", "4"]), default=None,
              help="Bits of V's kept values under --quantize int4: 4 (symmetric, one scale per output column; "
                   "the default) or 8 (int8). Export targets widen 4-bit values to int8 codes. See "
                   "docs/quantization.md.")
@click.option("--safeguard/--no-safeguard", default=True, show_default=True,
              help="Also build the uniform allocation at the same bytes and keep it if it has lower held-out "
                   "perplexity (costs one extra model build and evaluation).")
@click.option("--gram-damping", type=click.FloatRange(0, 10), default=None,
              help="Add this fraction of the mean activation energy to the Gram's diagonal before whitening "
                   "(default: the config's; see docs/benchmarks.md section 2).")
@click.option("--refit-rounds", type=click.IntRange(0, 20), default=None,
              help="Alternate least-squares refits of V (on its kept entries) and U this many times per layer "
                   "(default: the config's; docs/benchmarks.md section 7).")
@click.option("--error-propagation/--no-error-propagation", default=None,
              help="Fit each block to the outputs of the already-compressed blocks (one more calibration pass; "
                   "default: the config's; docs/benchmarks.md section 7).")
@click.option("--device", type=DeviceType(), default="cpu", show_default=True,
              help="Where calibration, the sensitivity pass, the Grams, eigendecompositions, candidates and "
                   "factorizations run: cpu, cuda or cuda:N. The weights stay on the CPU; one block at a time "
                   "moves to the device.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary JSON line.")
@calibration_options
@trust_remote_code_option
def compress(model, budget, out, method, quantize, quant_method, quant_v_refit, quant_v_bits, safeguard, gram_damping, refit_rounds,
             error_propagation, device, overwrite, as_json, calib, calib_samples,
             sensitivity_samples, seq_len, eval_samples, seed, targets, exclude, byte_fractions, keep_ratios, objective, profile_dir, quiet,
             trust_remote_code):
    """Compress MODEL (a Hugging Face directory, a .gguf file, or smollm2-135m) into an artifact at --out."""
    from ..safe_io import OutputError, check_output
    try:        # before any work: --out replaceable (ours or empty, not the input / cwd), parent writable
        check_output(out, overwrite, "artifact", inputs=[model] if os.path.exists(model) else [])
    except OutputError as e:
        raise click.ClickException(str(e)) from e
    with friendly_errors():
        config, cal = build_configs(budget, method, calib, calib_samples, seq_len, eval_samples, seed, targets,
                                    exclude, byte_fractions, keep_ratios, objective, quantize, sensitivity_samples)
        config = config.replace(safeguard=safeguard)
        if gram_damping is not None:
            config = config.replace(gram_damping=gram_damping)
        if refit_rounds is not None:
            config = config.replace(refit_rounds=refit_rounds)
        if error_propagation is not None:
            config = config.replace(error_propagation=error_propagation)
        if quant_method is not None:
            config = config.replace(quant_method=quant_method, quant_u_method=quant_method)
        if quant_v_refit is not None:
            config = config.replace(quant_v_refit=quant_v_refit)
        if quant_v_bits is not None:
            config = config.replace(quant_v_bits=int(quant_v_bits))
        from ..compress.pipeline import compress as run_compress, load_or_profile, prepare_calibration
        from ..models import load_model
        from ..targets import select_targets
        lm = load_model(model, trust_remote_code=trust_remote_code)
        select_targets(lm.model, config.targets, config.exclude)     # fail fast on bad patterns
        from ..compress.distributed import world
        quiet = quiet or not world().main       # torchrun: the other ranks help profile, then exit quietly
        started = time.perf_counter()           # seconds.total counts from here (calibration, profile, compress)
        data = prepare_calibration(lm.tokenizer, cal, lm.model, progress=not quiet)
        prof = load_or_profile(lm.model, lm.tokenizer, config, cal, data, profile_dir, progress=not quiet,
                               log=None if quiet else (lambda m: click.echo(m, err=True)), device=device)
        if not world().main:
            return
        try:
            res = run_compress(lm.model, lm.tokenizer, config, cal, out=out, overwrite=overwrite, profile=prof,
                               data=data, inplace=True, progress=not quiet, source=lm.source, device=device,
                               started=started)
        finally:
            if profile_dir is None:
                import shutil
                shutil.rmtree(prof.cache_dir, ignore_errors=True)
    b = res.manifest["budget"]
    summary = {"out": res.path, "method": method, **({"quantize": quantize} if quantize else {}), "target_removed": budget,
               "removed_bytes_fraction": round(b["removed_bytes_fraction"], 4),
               "compressed_bytes": b["compressed_bytes"], "dense_bytes": b["dense_bytes"],
               "params_ratio": round(b["params_ratio"], 4), "layers_compressed": b["layers_compressed"],
               "layers_dense": b["layers_dense"], "device": res.manifest["device"],
               "seconds": res.manifest["seconds"]}
    if not as_json:
        rows = [[k, v] for k, v in summary.items() if k != "seconds"]
        click.echo(format_table(["field", "value"], rows))
        click.echo()
        click.echo(format_table(*seconds_table(res.manifest["seconds"])))
    echo_json_line(summary)
