"""Export a (ROCKET-compressed or dense) transformers model to an ONNX folder: the artifact-level entry points.

:func:`export_model` / :func:`export_artifact` write ``model.onnx`` (+ external data), the tokenizer, ``config.json``
and ``export.json`` (names: :mod:`rocket_deploy.onnx_contract`), then check and validate the graph. The pieces:

* :mod:`.graph_io` -- the wrappers torch.export traces, the I/O names (Optimum's layout) and dynamic axes;
* :mod:`.options` -- targets, dtypes, plugin domain, quantized-export settings (checked before tracing);
* :mod:`.stand_ins` -- which export module replaces which ROCKET / quantized layer;
* :mod:`.driver` -- ``torch.onnx.export(dynamo=True)`` and the target passes (:mod:`.lowering` for ``ort``,
  :mod:`.trt_graph` for ``trt``);
* :mod:`.validate` -- ONNX Runtime against torch.

Targets: ``trt`` keeps the sparse V product as the ``RocketSparseVMatMul`` node (the TensorRT plugin; domain
``rocket``, or ``trt.plugins`` for ONNX Runtime's TensorRT EP); ``ort`` lowers it to standard ops. Quantized
artifacts (format version 2): see docs/quantization.md, "Export".
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from typing import Any

from torch import nn

from rocket_deploy.onnx_contract import (DATA_FILE, EXPORT_INFO, INFO_DTYPE, INFO_EXTERNAL_DATA, INFO_FILE_BYTES,
                                         INFO_INPUTS, INFO_IS_DECODER, INFO_OUTPUTS, INFO_PATH, INFO_PLUGIN_DOMAIN,
                                         INFO_SECONDS, INFO_STATS, INFO_TARGET, INFO_VALIDATION, META_DTYPE,
                                         META_IS_DECODER, META_PLUGIN_DOMAIN, META_TARGET, MODEL_FILE, ONNX_DOMAIN,
                                         PRODUCER_NAME, onnx_file_bytes)

from .graph_io import dynamic_shapes, example_inputs, io_names, is_decoder_model, wrapper_for
from .options import DTYPES, TARGETS, ExportError, ExportOptions, quant_export_settings

__all__ = ["DTYPES", "TARGETS", "ExportError", "ExportOptions", "ExportResult", "check_onnx", "export_artifact",
           "export_model", "io_names", "onnx_file_bytes"]

EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024 ** 3)


@dataclasses.dataclass
class ExportResult:
    path: str                      # the .onnx file
    target: str
    dtype: str
    is_decoder: bool
    input_names: list[str]
    output_names: list[str]
    file_bytes: int                # model.onnx + external data
    stats: dict[str, Any]
    validation: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def info(self, external_data: bool, extra: dict | None = None) -> dict[str, Any]:
        """The ``export.json`` record (keys: :mod:`rocket_deploy.onnx_contract`) + ``extra``."""
        out = {INFO_PATH: self.path, INFO_TARGET: self.target, INFO_DTYPE: self.dtype,
               INFO_IS_DECODER: self.is_decoder, INFO_INPUTS: self.input_names, INFO_OUTPUTS: self.output_names,
               INFO_FILE_BYTES: self.file_bytes, INFO_STATS: self.stats, INFO_VALIDATION: self.validation,
               INFO_SECONDS: self.seconds, INFO_EXTERNAL_DATA: external_data}
        if "plugin_domain" in self.stats:
            out[INFO_PLUGIN_DOMAIN] = self.stats["plugin_domain"]
        return {**out, **(extra or {})}


def export_model(model: nn.Module, out_dir: str, *, target: str = "ort", dtype: str = "fp32", tokenizer=None,
                 external_data: bool | None = None, merge: str = "auto", weights_fp16: bool = True,
                 validate: bool = True, overwrite: bool = False, verbose: bool = False,
                 reference: nn.Module | None = None, extra_info: dict | None = None,
                 int8_compute: str = "weight-only", int4_accuracy_level: int | None = None,
                 debug_metadata: bool = False, plugin_domain: str = ONNX_DOMAIN, opset: int | None = None,
                 device: str = "cpu", atol: float | None = None, rtol: float | None = None,
                 progress=None) -> ExportResult:
    """Export ``model`` into ``out_dir/model.onnx`` (+ ``model.onnx.data`` when external, tokenizer, export.json).

    ``model`` computes in fp32 (the reference for validation); ``dtype="fp16"`` / ``"bf16"`` exports an fp16 /
    bfloat16 copy (bf16 graphs: ONNX Runtime's CPU provider has no bfloat16 kernels, so validation runs an fp32
    copy of the same graph -- its bf16 weights upcast exactly -- against torch computing in bf16; see
    :func:`rocket_deploy.export.validate.validate_export`). ``opset``: the graph's default-domain opset (None:
    18; :func:`~rocket_deploy.export.options.supported_opsets`). ``device``: trace on "cpu" or "cuda" (the model is
    moved there for the trace and back). ``atol`` / ``rtol``: validation bounds replacing the dtype's defaults.
    ``progress``: a callable taking one line per step (tracing, passes, saving, each validation check), or None.
    ``external_data``: None = automatic (models above ~1.5 GB), True = always, False = never.
    ``merge`` / ``weights_fp16``: ort-target options of :func:`lower_rocket_nodes` / :func:`store_weights_fp16`.
    Quantized models (ort target only): ``int8_compute`` "weight-only" (int8 weights dequantized once at session
    start: exact) or "dynamic" (``DequantizeLinear -> MatMul``, fused by ORT into int8 kernels that quantize the
    activations per call); ``int4_accuracy_level`` of ``MatMulNBits`` (default 4: int8 activations, the fast CPU
    kernel; 0: float compute, weight-only exact). Graphs whose activations are quantized are validated on their
    outputs' distribution (next-token KL, relative RMS: :data:`rocket_deploy.export.validate.ACT_QUANT_TOLERANCE`).
    ``debug_metadata``: keep the exporter's per-node stack traces and module paths (see
    :func:`rocket_deploy.export.driver.strip_node_metadata`). ``plugin_domain`` (trt target): the domain of the
    ``RocketSparseVMatMul`` nodes, ``"rocket"`` (TensorRT's parser, ``rocket-deploy build``) or ``"trt.plugins"``
    (ONNX Runtime's TensorRT execution provider).
    """
    import onnx_ir as ir

    from rocket_deploy.safe_io import atomic_directory, check_output

    from .driver import finish_graph, stage, trace
    from .stand_ins import export_modules
    opts = ExportOptions(target=target, dtype=dtype, opset=opset, device=device, atol=atol, rtol=rtol,
                         plugin_domain=plugin_domain, merge=merge, weights_fp16=weights_fp16,
                         int8_compute=int8_compute, int4_accuracy_level=int4_accuracy_level,
                         debug_metadata=debug_metadata)
    inputs_read = [(extra_info or {}).get("artifact"), ((extra_info or {}).get("source") or {}).get("directory")]
    check_output(out_dir, overwrite, "export", inputs=inputs_read)     # before the work, not after it
    t0 = time.perf_counter()
    model = model.eval()
    ref = reference if reference is not None else model
    tdtype = DTYPES[dtype]
    quant = quant_export_settings(model, target, dtype, int8_compute, int4_accuracy_level)
    src = model if next(model.parameters()).dtype == tdtype else copy.deepcopy(model).to(tdtype)
    inputs, outputs = io_names(src)
    with _on_device(src, opts.device, restore=src is model), \
            export_modules(src, target, tdtype, quant.get("int8_compute", "weight-only"),
                           quant.get("int4_accuracy_level", 0)) as n_rocket:
        args = _to_device(example_inputs(src, dtype=tdtype), opts.device)
        ir_model = trace(wrapper_for(src), args, dynamic_shapes=dynamic_shapes(src), input_names=inputs,
                         output_names=outputs, quantized=bool(quant), verbose=verbose, opset=opset,
                         progress=progress)
    del src, args
    passes = finish_graph(ir_model, target, dtype, quantized=bool(quant), merge=merge, weights_fp16=weights_fp16,
                          plugin_domain=plugin_domain, debug_metadata=debug_metadata, opset=opset,
                          progress=progress)
    stats: dict[str, Any] = {"rocket_layers": n_rocket, "rocket_nodes": passes.pop("rocket_nodes"),
                             "opset": passes.pop("opset")}
    if quant:
        stats["quantization"] = quant
    if opts.device != "cpu":
        stats["trace_device"] = opts.device
    stats.update(passes)
    decoder = is_decoder_model(model)
    ir_model.producer_name = PRODUCER_NAME
    meta = {META_TARGET: target, META_DTYPE: dtype, META_IS_DECODER: str(decoder).lower()}
    if target == "trt":
        meta[META_PLUGIN_DOMAIN] = plugin_domain
    for k, v in meta.items():
        ir_model.metadata_props[k] = v
    est = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    # ort-packed: always external -- ONNX Runtime then reads the fp16 weights straight into their tensors (peak RSS
    # about 1x the weights instead of 2x with them inside the protobuf; docs/export.md)
    use_external = external_data if external_data is not None else (est > EXTERNAL_DATA_THRESHOLD
                                                                     or target == "ort-packed")
    with atomic_directory(out_dir, overwrite, kind="export", inputs=inputs_read) as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        stage(progress, f"saving {MODEL_FILE}" + (f" + {DATA_FILE} (external data)" if use_external else ""))
        ir.save(ir_model, path, external_data=DATA_FILE if use_external else None)
        del ir_model
        if tokenizer is not None:
            with contextlib.suppress(Exception):
                tokenizer.save_pretrained(tmp)
        with contextlib.suppress(Exception):
            model.config.save_pretrained(tmp)
        if target == "ort" and decoder:             # ONNX Runtime GenAI runs the folder (docs/export.md)
            from .genai_config import write_genai_config
            write_genai_config(tmp, model.config.to_dict(), inputs, outputs)
        final = os.path.join(os.path.abspath(out_dir), MODEL_FILE)
        result = ExportResult(final, target, dtype, decoder, inputs, outputs, onnx_file_bytes(path), stats)
        stage(progress, "checking the saved graph (onnx.checker)")
        check_onnx(path, target)
        if validate:
            from .validate import validate_export
            result.validation = validate_export(path, ref, target=target, dtype=dtype,
                                                act_quant=quant.get("activations_quantized", False),
                                                atol=atol, rtol=rtol, progress=progress)
        result.seconds = round(time.perf_counter() - t0, 2)
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(result.info(use_external, extra_info), f, indent=1, default=float)
    return result


@contextlib.contextmanager
def _on_device(model: nn.Module, device: str, restore: bool):
    """``model`` on ``device`` inside the block; moved back to the CPU after it when ``restore`` (it is the
    caller's model, not an export copy)."""
    if device == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        if restore:
            model.to("cpu")


def _to_device(obj, device: str):
    import torch
    if device == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    return obj


def check_onnx(path: str, target: str) -> None:
    """``onnx.checker`` on the saved graph; the plugin op's schema (both plugin domains) is registered first."""
    import onnx

    from .schema import register_rocket_schema
    register_rocket_schema()
    try:
        onnx.checker.check_model(path, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph ({target} target): {e}") from e


def export_artifact(artifact: str, out_dir: str, *, target: str = "ort", dtype: str = "fp32", verify: bool = True,
                    trust_remote_code: bool = False, **kw) -> ExportResult:
    """Load a ROCKET artifact (fp32; ``verify`` / ``trust_remote_code``: see ``rocket_deploy.load_artifact``)
    and export it (see :func:`export_model`)."""
    import torch

    from rocket_deploy.artifact import load_artifact, read_manifest
    read_manifest(artifact)
    model, tokenizer, manifest = load_artifact(artifact, dtype=torch.float32, verify=verify,
                                               trust_remote_code=trust_remote_code)
    info = {"artifact": os.path.abspath(artifact), "budget": manifest.get("budget", {}).get("target_removed_fraction")}
    return export_model(model, out_dir, target=target, dtype=dtype, tokenizer=tokenizer, extra_info=info, **kw)
