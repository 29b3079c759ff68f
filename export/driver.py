"""The torch -> ONNX driver: ``torch.onnx.export(dynamo=True)`` with the custom ops' translations, quiet logs, the
optimizer that keeps quantized codes, and the target passes on the resulting ``onnx_ir`` model.

* :func:`trace` -- one module + example inputs -> ``onnx_ir.Model`` (opset 18, or the requested one: checked);
* :func:`finish_graph` -- the target's passes: ``ort`` lowers the plugin nodes to standard ops and stores exact-fp16
  weights as fp16; ``trt`` rewrites int4 ``MatMulNBits`` and moves the plugin nodes into the requested domain;
  both drop the per-node debugging metadata unless asked to keep it;
* :func:`export_layer` -- one ROCKET / quantized / plain layer through the same path (its stand-in, the same
  translations, optimizer and passes): the single-layer graphs of the tests and of bench/bench_quant_ops.py.

``progress`` (a callable taking one line, or None) gets a line as each step starts: tracing, optimising, the
target's passes, stripping metadata.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn

from rocket_deploy.onnx_contract import DIM_BATCH, DIM_SEQ, ONNX_DOMAIN, OPSET

from .options import DTYPES, ExportError, check_opset, check_options, quant_export_settings
from .stand_ins import stand_in

LAYER_INPUT, LAYER_OUTPUT = "x", "y"        # I/O names of the single-layer graphs of :func:`export_layer`
Progress = Callable[[str], None]


def stage(progress: Progress | None, line: str) -> None:
    """One progress line (nothing when ``progress`` is None)."""
    if progress is not None:
        progress(line)


def translation_table() -> dict:
    """The custom ops' ONNX translations: ``rocket::sparse_v_matmul`` and the ``rocket_quant`` ops."""
    from .quant_ops import custom_translation_table as quant_table
    from .rocket_op import custom_translation_table
    return {**custom_translation_table(), **quant_table()}


@contextlib.contextmanager
def attn_implementation(model: nn.Module, impl: str):
    """Temporarily set ``config._attn_implementation`` of every submodule that has one."""
    cfgs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    old = [c._attn_implementation for c in cfgs]
    for c in cfgs:
        with contextlib.suppress(Exception):
            c._attn_implementation = impl
    try:
        yield
    finally:
        for c, o in zip(cfgs, old):
            with contextlib.suppress(Exception):
                c._attn_implementation = o


def _keep_quantized_codes(node) -> bool | None:
    """``should_fold`` rule for the onnxscript optimizer: never fold a node that reads a quantized initializer
    (int8 / uint8 / int4 / float8 codes). Its default folds small inputs only (8192 elements), so tiny models would
    get fp32 weights in the file while real ones would not; this keeps every model's codes as stored (ONNX Runtime
    folds the dequantization at session start instead)."""
    import onnx_ir as ir
    quant = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT8E4M3FN)
    for v in node.inputs:
        if v is not None and v.is_initializer() and v.dtype in quant:
            return False
    return None


def optimize_graph(model, quantized: bool = False) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's ``optimize_ir`` + the ONNX fusions); quantized
    graphs with :func:`_keep_quantized_codes`."""
    import onnxscript
    import onnxscript.rewriter.onnx_fusions
    if quantized:
        onnxscript.optimizer.optimize_ir(model, should_fold=_keep_quantized_codes)
    else:
        onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def strip_node_metadata(model) -> int:
    """Drop the per-node debugging metadata the dynamo exporter writes (Python stack traces with local source paths,
    the FX node text, module hierarchy and name scopes): about 1.9 kB per node, 4.6 MB for SmolLM2-135M, and
    nothing a runtime reads. Returns the bytes removed."""
    removed = 0
    for g in [model.graph, *model.functions.values()]:
        for node in g.all_nodes():
            props = node.metadata_props
            removed += sum(len(k) + len(v) for k, v in props.items())
            props.clear()
    return removed


def trace(module: nn.Module, args: tuple, *, dynamic_shapes, input_names: list[str], output_names: list[str],
          quantized: bool = False, verbose: bool = False, opset: int | None = None,
          progress: Progress | None = None):
    """``torch.onnx.export(dynamo=True)`` of ``module(*args)`` at ``opset`` (default :data:`OPSET`), then
    :func:`optimize_graph` -> the ``onnx_ir.Model``. Quantized graphs are optimized with
    :func:`_keep_quantized_codes` (the file keeps the codes as stored). Raises :class:`ExportError` when the graph
    does not come out at the requested opset (the exporter's version conversion failed)."""
    check_opset(opset)
    want = OPSET if opset is None else int(opset)
    where = next((str(p.device) for p in module.parameters()), "cpu")
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters() if p.is_floating_point()})
    stage(progress, f"tracing with torch.onnx.export (dynamo, opset {want}, {'/'.join(dtypes) or 'no float'} "
                    f"weights, on {where})")
    onnx_log = logging.getLogger("torch.onnx")
    old_level = onnx_log.level
    with torch.no_grad(), warnings.catch_warnings(), attn_implementation(module, "sdpa"), \
            contextlib.redirect_stdout(None if verbose else open(os.devnull, "w")), \
            contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if not verbose:
            onnx_log.setLevel(logging.ERROR)
            stack.callback(onnx_log.setLevel, old_level)
        prog = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                 input_names=input_names, output_names=output_names, opset_version=want,
                                 custom_translation_table=translation_table(), verbose=verbose,
                                 report=False, optimize=False)
    model = prog.model
    got = model.opset_imports.get("", OPSET)
    if got != want:
        raise ExportError(f"the exporter could not convert the graph to opset {want} (it is at opset {got}); "
                          f"export with --opset {got} or the default {OPSET}")
    stage(progress, "optimising the graph (constant folding, fusions" +
          (", quantized codes kept as stored)" if quantized else ")"))
    optimize_graph(model, quantized)
    return model


def finish_graph(ir_model, target: str, dtype: str, *, quantized: bool = False, merge: str = "auto",
                 weights_fp16: bool = True, plugin_domain: str = ONNX_DOMAIN,
                 debug_metadata: bool = False, opset: int | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """The target's passes over a traced graph (see the module doc). Returns what they did. ``opset``: the opset
    asked for explicitly; a pass that needs a higher one (int4 / fp8 on the trt target) then raises
    :class:`ExportError` instead of raising the opset silently."""
    from .lowering import lower_rocket_nodes, rocket_nodes, store_weights_fp16
    n_rocket = len(rocket_nodes(ir_model.graph))
    stats: dict[str, Any] = {"rocket_nodes": n_rocket, "opset": ir_model.opset_imports.get("", OPSET)}
    if target == "ort":
        stage(progress, f"lowering the custom op: {n_rocket} RocketSparseVMatMul node(s) -> standard ops "
                        f"(merge {merge})")
        stats["lowering"] = lower_rocket_nodes(ir_model, merge=merge)
        if weights_fp16 and dtype == "fp32":
            stage(progress, "storing exact-fp16 weights as fp16")
            stats["storage"] = store_weights_fp16(ir_model)
    else:
        if quantized:
            stage(progress, "preparing quantized layers for TensorRT (DequantizeLinear, opset)")
            from .trt_graph import prepare_trt_graph
            stats["trt_quant"] = prepare_trt_graph(ir_model)
            stats["opset"] = stats["trt_quant"]["opset"]
            if opset is not None and stats["opset"] != int(opset):
                raise ExportError(f"the trt graph of this quantized model needs opset {stats['opset']} "
                                  f"(quantized DequantizeLinear); drop --opset or use --opset {stats['opset']}")
        stage(progress, f"keeping the custom op: {n_rocket} RocketSparseVMatMul node(s) in domain {plugin_domain}")
        from .trt_graph import set_plugin_domain
        set_plugin_domain(ir_model, plugin_domain)
        stats["plugin_domain"] = plugin_domain
        if target == "ort-packed":          # fp16 weights kept fp16 for the ONNX Runtime custom-op library
            stage(progress, "keeping exact-fp16 weights fp16 (RocketMatMulF16, fp16 V values)")
            from .trt_graph import pack_for_ort
            stats["ort_packed"] = pack_for_ort(ir_model)
    if not debug_metadata:
        stage(progress, "stripping the exporter's per-node metadata")
        stats["stripped_metadata_bytes"] = strip_node_metadata(ir_model)
    return stats


def export_layer(layer: nn.Module, example: torch.Tensor, *, target: str = "ort", dtype: str = "fp32",
                 int8_compute: str = "weight-only", int4_accuracy_level: int | None = None, merge: str = "auto",
                 weights_fp16: bool = True, plugin_domain: str = ONNX_DOMAIN):
    """One layer (RocketLinear, QuantRocketLinear, QuantDenseLinear or any plain module) exported the way
    :func:`rocket_deploy.export.export_model` exports it inside a model: ``x [..., d_in] -> y [..., d_out]``
    (:data:`LAYER_INPUT` / :data:`LAYER_OUTPUT`; the leading axes of ``example``, one or two, are dynamic:
    ``batch_size`` [, ``sequence_length``]). Returns ``(onnx_ir.Model, settings)`` -- the quantized-export
    settings of :func:`quant_export_settings` and the passes' stats."""
    check_options(target, dtype, plugin_domain)
    if example.dim() not in (2, 3):
        raise ValueError(f"example must be [batch, d_in] or [batch, seq, d_in], got shape {tuple(example.shape)}")
    quant = quant_export_settings(layer, target, dtype, int8_compute, int4_accuracy_level)
    tdtype = DTYPES[dtype]
    mod = stand_in(layer, target, tdtype, quant.get("int8_compute", "weight-only"), quant.get("int4_accuracy_level", 0))
    if mod is None:                          # a plain module: a copy in the compute dtype
        import copy
        mod = copy.deepcopy(layer).to(tdtype)
    mod = mod.eval()
    dims = {0: torch.export.Dim(DIM_BATCH)}
    if example.dim() == 3:
        dims[1] = torch.export.Dim(DIM_SEQ)
    ir_model = trace(mod, (example.to(tdtype),), dynamic_shapes=(dims,), input_names=[LAYER_INPUT],
                     output_names=[LAYER_OUTPUT], quantized=bool(quant))
    stats = finish_graph(ir_model, target, dtype, quantized=bool(quant), merge=merge, weights_fp16=weights_fp16,
                         plugin_domain=plugin_domain)
    return ir_model, {"quantization": quant, **stats}
