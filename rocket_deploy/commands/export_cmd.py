"""``rocket-deploy export DIR --out OUT [--target ...] [--dtype fp32|fp16|bf16] [--opset N] [--device cpu|cuda]``."""
from __future__ import annotations

import os
import time

import click

from ..onnx_contract import EXPORT_DTYPES, EXPORT_TARGETS, ONNX_DOMAIN, ORT_TRT_PLUGIN_DOMAIN, PLUGIN_DOMAINS
from ._common import echo_json_line, format_table, friendly_errors
from ._options import no_verify_option, trust_remote_code_option


@click.command("export")
@click.argument("source", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Output directory (gets model.onnx, tokenizer, export.json).")
@click.option("--target", type=click.Choice(EXPORT_TARGETS), default="ort", show_default=True,
              help="ort: standard ONNX ops only (any ONNX Runtime). trt: the sparse V product as one "
                   "rocket.RocketSparseVMatMul node for the TensorRT plugin (see docs/export.md). ort-packed: "
                   "ONNX Runtime on the CPU with the plugins_ort custom-op library (`make ort-ops`), every weight "
                   "kept fp16 and V kept packed in memory, fp32 compute (unquantized artifacts).")
@click.option("--dtype", type=click.Choice(EXPORT_DTYPES), default="fp32", show_default=True,
              help="Compute dtype carried in the graph (fp16 / bf16 graphs are strongly typed for TensorRT). bf16: "
                   "ONNX Runtime's CPU provider has no bfloat16 kernels, so validation runs an fp32 copy of the "
                   "same graph against torch in bf16 (see docs/export.md).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset of the graph's standard ops (default 18, the exporter's own; higher ones are "
                   "converted to; the range this exporter supports is checked).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model is traced (cuda needs a GPU visible to torch); validation runs on the CPU.")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Validation: absolute tolerance (default per dtype: fp32 1e-4, fp16 2e-2, bf16 1e-1).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Validation: tolerance relative to max |torch output| (default per dtype: fp32 1e-3, fp16 3e-2, "
                   "bf16 8e-2). --atol / --rtol also replace the KL criterion of activation-quantized graphs.")
@click.option("--dense", is_flag=True, help="SOURCE is a dense model (HF directory, .gguf or smollm2-135m), not an artifact.")
@click.option("--external-data", is_flag=True, help="Always write weights to model.onnx.data (automatic above ~1.5 GB).")
@click.option("--merge", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
              help="ort target: multiply U V into one weight at session start for layers where that moves fewer "
                   "bytes per token (auto), for none, or for all.")
@click.option("--int8-compute", type=click.Choice(["weight-only", "dynamic"]), default="weight-only", show_default=True,
              help="Quantized artifacts, ort target: int8 weights dequantized once at session start (weight-only, "
                   "exact) or DequantizeLinear -> MatMul, which ONNX Runtime runs as dynamic int8 (activations "
                   "quantized per call: faster on CPU, not exact; fp32 only).")
@click.option("--int4-accuracy-level", type=click.IntRange(0, 4), default=None,
              help="Quantized artifacts, ort target: accuracy_level of the int4 MatMulNBits nodes. 4 (default): "
                   "int8 activations per block, the fast CPU kernel; 0: float compute (weight-only, exact). See "
                   "docs/quantization.md.")
@click.option("--plugin-domain", type=click.Choice(PLUGIN_DOMAINS), default=ONNX_DOMAIN, show_default=True,
              help=f"trt target: ONNX domain of the RocketSparseVMatMul nodes. {ONNX_DOMAIN}: for TensorRT's own "
                   f"parser (`rocket-deploy build`, trtexec); {ORT_TRT_PLUGIN_DOMAIN}: for ONNX Runtime's TensorRT "
                   f"execution provider, which hands only that domain to plugins (see docs/export.md).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs torch comparison.")
@click.option("--debug-metadata", is_flag=True,
              help="Keep the exporter's per-node metadata (Python stack traces, module paths: 4.6 MB for "
                   "SmolLM2-135M), which is stripped by default.")
@click.option("--triton-repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton model repository here (DIR/<name>/config.pbtxt, DIR/<name>/1/model.*).")
@click.option("--triton-name", default=None, help="Model name in the Triton repository (default: the --out folder name).")
@click.option("--overwrite", is_flag=True, help="Replace --out (and the Triton model folder) if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary JSON line.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr.")
@no_verify_option
@trust_remote_code_option
def export(source, out, target, dtype, opset, device, atol, rtol, dense, external_data, merge, int8_compute,
           int4_accuracy_level, plugin_domain, no_validate, debug_metadata, triton_repo, triton_name, overwrite,
           as_json, quiet, no_verify, trust_remote_code):
    """Export SOURCE (a ROCKET artifact directory) to ONNX at --out/model.onnx and validate it against torch.

    Progress goes to stderr, one line per step (tracing, optimising, the target's passes, saving, each validation
    check); --quiet turns it off.
    """
    from ..export.options import ExportError as OptionError
    from ..export.options import check_device, check_opset, check_tolerance
    from ..safe_io import OutputError, check_output
    for check, value, hint in ((check_opset, opset, "--opset"), (check_device, device, "--device"),
                               (lambda v: check_tolerance("atol", v), atol, "--atol"),
                               (lambda v: check_tolerance("rtol", v), rtol, "--rtol")):
        try:                    # before loading anything
            check(value)
        except OptionError as e:
            raise click.BadParameter(str(e), param_hint=hint) from None
    t_start = time.perf_counter()

    def progress(line: str) -> None:
        click.echo(f"[export {time.perf_counter() - t_start:6.1f}s] {line}", err=True)

    try:        # before any work: --out (and the Triton folder) replaceable only when ours, parents writable
        check_output(out, overwrite, "export", inputs=[source])
        if triton_repo:
            check_output(os.path.join(triton_repo, triton_name or os.path.basename(os.path.abspath(out))), overwrite,
                         "triton", inputs=[source])
    except OutputError as e:
        raise click.ClickException(str(e)) from e
    with friendly_errors():
        from ..artifact import read_manifest
        from ..export import ExportError, export_artifact, export_model
        from ..export.validate import ValidationShapeError, format_report
        kw = dict(target=target, dtype=dtype, external_data=True if external_data else None, merge=merge,
                  validate=not no_validate, overwrite=overwrite, int8_compute=int8_compute,
                  int4_accuracy_level=int4_accuracy_level, debug_metadata=debug_metadata, plugin_domain=plugin_domain,
                  opset=opset, device=device, atol=atol, rtol=rtol, progress=None if quiet else progress)
        try:
            if not quiet:
                progress(f"loading {'the dense model' if dense else 'the artifact'} {source}")
            if dense:
                from ..models import load_model
                lm = load_model(source, trust_remote_code=trust_remote_code)
                res = export_model(lm.model, out, tokenizer=lm.tokenizer, extra_info={"source": lm.source}, **kw)
            else:
                read_manifest(source)           # "not an artifact" -> a click error naming the fix
                res = export_artifact(source, out, verify=not no_verify, trust_remote_code=trust_remote_code, **kw)
        except ValidationShapeError as e:
            raise click.ClickException(f"export validation: {e}") from e
        except ExportError as e:
            raise click.ClickException(str(e)) from e
        model_dir = None
        if triton_repo:
            from ..export.triton import write_triton_repo
            model_dir = write_triton_repo(triton_repo, res.path, name=triton_name or os.path.basename(os.path.abspath(out)),
                                          backend="tensorrt" if target == "trt" else "onnxruntime", overwrite=overwrite)
    v = res.validation
    if not as_json:
        rows = [["file", res.path], ["target", target], ["dtype", dtype], ["opset", res.stats["opset"]],
                ["bytes", res.file_bytes],
                ["rocket layers", res.stats["rocket_layers"]], ["seconds", res.seconds]]
        if target == "trt":
            rows.append(["plugin domain", res.stats["plugin_domain"]])
        if "lowering" in res.stats:
            lw = res.stats["lowering"]
            rows.append(["lowering", f"{lw['dense_v']} dense-V, {lw['sparse_v']} packed-V, {lw['merged']} merged"])
        q = res.stats.get("quantization")
        if q:
            rows.append(["quantized", f"{'/'.join(q['formats'])}: {q['compute']} (opset {res.stats['opset']})"])
        if model_dir:
            rows.append(["triton model", model_dir])
        click.echo(format_table(["field", "value"], rows))
        if v is not None:
            click.echo(format_report(v))
    if v is not None and not v["passed"]:
        click.secho("WARNING: the exported graph does NOT match torch within tolerance (see the table above); "
                    "check the model before deploying it.", fg="red", bold=True, err=True)
    echo_json_line({"out": res.path, "target": target, "dtype": dtype, "opset": res.stats["opset"],
                    "bytes": res.file_bytes,
                    "validated": v is not None, "passed": None if v is None else v["passed"],
                    "max_rel": None if v is None else max(o["max_rel"] for s in v["steps"] for o in s["outputs"]),
                    "quantization": res.stats.get("quantization"), "plugin_domain": res.stats.get("plugin_domain"),
                    "triton_model": model_dir, "seconds": res.seconds})
    if v is not None and not v["passed"]:
        raise click.exceptions.Exit(1)      # its own validation failed: a non-zero exit status for scripts / CI
