"""Export a (ROCKET-compressed or dense) transformers model to ONNX with ``torch.onnx.export(dynamo=True)``.

Decoders get one ``model.onnx`` with a KV cache and the Optimum I/O names::

    inputs : input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64, position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]   (past may be 0)
    outputs: logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past+seq, head_dim]

Encoders: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``.

Targets: ``trt`` keeps the sparse V product as the ``rocket.RocketSparseVMatMul`` node (the TensorRT plugin);
``ort`` lowers it to standard ops (:mod:`rocket_deploy.export.lowering`).

Quantized artifacts (format version 2, ``--quantize``): the quantized layers are swapped for the stand-ins of
:mod:`rocket_deploy.export.quantized_ops` -- ``ort``: ``com.microsoft.MatMulNBits`` for int4 weights, int8 / fp8
weights dequantized in-graph (folded by ORT at session start) or, ``int8_compute="dynamic"``,
``DequantizeLinear -> MatMul`` (ORT's dynamic int8 kernels); ``trt``: weight-only ``DequantizeLinear`` for U and
the plugin node with int8 / fp8 V codes + per-column scales (``value_type`` 1 / 2). See docs/quantization.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from rocket_deploy.hf_compat import cache_kwarg
from rocket_deploy.onnx_contract import (DATA_FILE, EXPORT_INFO, MODEL_FILE, OPSET, decoder_io_names, encoder_io_names,
                                         onnx_file_bytes)
from rocket_deploy.rocket_linear import RocketLinear
from rocket_deploy.targets import set_module

from .rocket_op import ExportRocketLinear, custom_translation_table

TARGETS = ("ort", "trt")
INT8_COMPUTE = ("weight-only", "dynamic")
INT4_ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_INT4_ACCURACY_LEVEL = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024 ** 3)


class ExportError(RuntimeError):
    """The export or its validation failed; the message says why and what to change."""


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


def is_decoder_model(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__


def decoder_geometry(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers), int(kv), int(head_dim)


def io_names(model: nn.Module) -> tuple[list[str], list[str]]:
    if not is_decoder_model(model):
        return encoder_io_names()
    return decoder_io_names(decoder_geometry(model.config)[0])


class DecoderWrapper(nn.Module):
    """Flat tensors in / out around a causal LM with a DynamicCache (what torch.export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = decoder_geometry(model.config)[0]
        self.cache_arg = cache_kwarg(model)   # torch-side keyword only; the graph keeps the past_key_values.* names

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        present = []
        for layer in getattr(out, self.cache_arg).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class EncoderWrapper(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def is_quantized_model(model: nn.Module) -> bool:
    from rocket_deploy.quant_linear import QUANT_MODULES
    return any(isinstance(m, QUANT_MODULES) for m in model.modules())


@contextlib.contextmanager
def export_modules(model: nn.Module, target: str = "ort", dtype: torch.dtype = torch.float32,
                   int8_compute: str = "weight-only", int4_accuracy_level: int = 0):
    """Temporarily replace every RocketLinear by :class:`ExportRocketLinear` (the custom op) and every quantized
    layer (QuantRocketLinear / QuantDenseLinear) by its export stand-in for ``target``
    (:func:`rocket_deploy.export.quantized_ops.export_module_for`). Yields the number of ROCKET layers."""
    from rocket_deploy.quant_linear import QUANT_MODULES, QuantRocketLinear

    from .quantized_ops import export_module_for
    swapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (RocketLinear, *QUANT_MODULES))]
    n_rocket = 0
    for name, mod in swapped:
        if isinstance(mod, RocketLinear):
            new = ExportRocketLinear(mod)
        else:
            new = export_module_for(mod, int8_compute == "dynamic", target=target, dtype=dtype,
                                    accuracy_level=int4_accuracy_level)
        n_rocket += isinstance(mod, (RocketLinear, QuantRocketLinear))
        set_module(model, name, new)
    try:
        yield n_rocket
    finally:
        for name, mod in swapped:
            set_module(model, name, mod)


@contextlib.contextmanager
def _attn_implementation(model: nn.Module, impl: str):
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


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 3, past: int = 4, dtype=torch.float32):
    """Tracing inputs: sizes >= 2 so that torch.export keeps every axis symbolic."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    if not is_decoder_model(model):
        return (ids, torch.ones(batch, seq, dtype=torch.int64))
    n, kv, hd = decoder_geometry(model.config)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    pkv = [torch.zeros(batch, kv, past, hd, dtype=dtype) for _ in range(2 * n)]
    return (ids, mask, pos, pkv)


def dynamic_shapes(model: nn.Module):
    Dim = torch.export.Dim
    batch, seq = Dim("batch"), Dim("sequence_length")
    if not is_decoder_model(model):
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    n = decoder_geometry(model.config)[0]
    past = Dim("past_sequence_length", min=0)
    total = Dim("total_sequence_length")
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: past} for _ in range(2 * n)])


def translation_table() -> dict:
    """The custom ops' ONNX translations: ``rocket::sparse_v_matmul`` and the ``rocket_quant`` ops."""
    from .quantized_ops import custom_translation_table as quant_table
    return {**custom_translation_table(), **quant_table()}


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


def _optimize_keeping_codes(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs, with :func:`_keep_quantized_codes`."""
    import onnxscript
    import onnxscript.rewriter.onnx_fusions
    onnxscript.optimizer.optimize_ir(model, should_fold=_keep_quantized_codes)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def strip_node_metadata(model) -> int:
    """Drop the per-node debugging metadata the dynamo exporter writes (Python stack traces with local source paths,
    the FX node text, module hierarchy and name scopes): about 1.9 kB per node, 4.6 MB for SmolLM2-135M, and
    nothing a runtime reads. Returns the bytes removed."""
    removed = 0
    graphs = [model.graph, *model.functions.values()]
    for g in graphs:
        for node in g.all_nodes():
            props = node.metadata_props
            removed += sum(len(k) + len(v) for k, v in props.items())
            props.clear()
    return removed


def _torch_export(model: nn.Module, dtype: torch.dtype, verbose: bool, quantized: bool = False):
    wrapper = DecoderWrapper(model) if is_decoder_model(model) else EncoderWrapper(model)
    inputs, outputs = io_names(model)
    args = example_inputs(model, dtype=dtype)
    import logging
    onnx_log = logging.getLogger("torch.onnx")
    old_level = onnx_log.level
    with torch.no_grad(), warnings.catch_warnings(), _attn_implementation(model, "sdpa"), \
            contextlib.redirect_stdout(None if verbose else open(os.devnull, "w")), \
            contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if not verbose:
            onnx_log.setLevel(logging.ERROR)
            stack.callback(onnx_log.setLevel, old_level)
        prog = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=dynamic_shapes(model),
                                 input_names=inputs, output_names=outputs, opset_version=OPSET,
                                 custom_translation_table=translation_table(), verbose=verbose,
                                 report=False, optimize=not quantized)
        if quantized:
            _optimize_keeping_codes(prog.model)
    return prog, inputs, outputs


def export_model(model: nn.Module, out_dir: str, *, target: str = "ort", dtype: str = "fp32", tokenizer=None,
                 external_data: bool | None = None, merge: str = "auto", weights_fp16: bool = True,
                 validate: bool = True, overwrite: bool = False, verbose: bool = False,
                 reference: nn.Module | None = None, extra_info: dict | None = None,
                 int8_compute: str = "weight-only", int4_accuracy_level: int | None = None,
                 debug_metadata: bool = False) -> ExportResult:
    """Export ``model`` into ``out_dir/model.onnx`` (+ ``model.onnx.data`` when external, tokenizer, export.json).

    ``model`` computes in fp32 (the reference for validation); ``dtype="fp16"`` exports an fp16 copy.
    ``external_data``: None = automatic (models above ~1.5 GB), True = always, False = never.
    ``merge`` / ``weights_fp16``: ort-target options of :func:`lower_rocket_nodes` / :func:`store_weights_fp16`.
    Quantized models (ort target only): ``int8_compute`` "weight-only" (int8 weights dequantized once at session
    start: exact) or "dynamic" (``DequantizeLinear -> MatMul``, fused by ORT into int8 kernels that quantize the
    activations per call); ``int4_accuracy_level`` of ``MatMulNBits`` (default 4: int8 activations, the fast CPU
    kernel; 0: float compute, weight-only exact). Graphs whose activations are quantized are validated on their
    outputs' distribution (next-token KL, relative RMS: :data:`rocket_deploy.export.validate.ACT_QUANT_TOLERANCE`).
    ``debug_metadata``: keep the exporter's per-node stack traces and module paths (see :func:`strip_node_metadata`).
    """
    import onnx_ir as ir

    from rocket_deploy.artifact import atomic_directory
    from .lowering import lower_rocket_nodes, rocket_nodes, store_weights_fp16
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    model = model.eval()
    ref = reference if reference is not None else model
    tdtype = DTYPES[dtype]
    quant = quant_export_settings(model, target, dtype, int8_compute, int4_accuracy_level)
    src = model if next(model.parameters()).dtype == tdtype else copy.deepcopy(model).to(tdtype)
    with export_modules(src, target, tdtype, quant.get("int8_compute", "weight-only"),
                        quant.get("int4_accuracy_level", 0)) as n_rocket:
        prog, inputs, outputs = _torch_export(src, tdtype, verbose, quantized=bool(quant))
    del src
    ir_model = prog.model
    stats: dict[str, Any] = {"rocket_layers": n_rocket, "rocket_nodes": len(rocket_nodes(ir_model.graph)),
                             "opset": OPSET}
    if quant:
        stats["quantization"] = quant
    if target == "ort":
        stats["lowering"] = lower_rocket_nodes(ir_model, merge=merge)
        if weights_fp16 and dtype == "fp32":
            stats["storage"] = store_weights_fp16(ir_model)
    elif quant:
        from .quantized_ops import prepare_trt_graph
        stats["trt_quant"] = prepare_trt_graph(ir_model)
        stats["opset"] = stats["trt_quant"]["opset"]
    if not debug_metadata:
        stats["stripped_metadata_bytes"] = strip_node_metadata(ir_model)
    ir_model.producer_name = "rocket-deploy"
    meta = {"rocket.target": target, "rocket.dtype": dtype, "rocket.is_decoder": str(is_decoder_model(model)).lower()}
    for k, v in meta.items():
        ir_model.metadata_props[k] = v
    est = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)
    use_external = external_data if external_data is not None else est > EXTERNAL_DATA_THRESHOLD
    with atomic_directory(out_dir, overwrite) as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        ir.save(ir_model, path, external_data=DATA_FILE if use_external else None)
        del prog, ir_model
        if tokenizer is not None:
            with contextlib.suppress(Exception):
                tokenizer.save_pretrained(tmp)
        with contextlib.suppress(Exception):
            model.config.save_pretrained(tmp)
        final = os.path.join(os.path.abspath(out_dir), MODEL_FILE)
        result = ExportResult(final, target, dtype, is_decoder_model(model), inputs, outputs,
                              onnx_file_bytes(path), stats)
        check_onnx(path, target)
        if validate:
            from .validate import validate_export
            result.validation = validate_export(path, ref, target=target, dtype=dtype,
                                                act_quant=quant.get("activations_quantized", False))
        result.seconds = round(time.perf_counter() - t0, 2)
        info = {**result.to_dict(), "external_data": use_external, **(extra_info or {})}
        with open(os.path.join(tmp, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=1, default=float)
    return result


def quant_export_settings(model: nn.Module, target: str, dtype: str, int8_compute: str = "weight-only",
                          int4_accuracy_level: int | None = None) -> dict:
    """Check the quantized-export options against the model / target / dtype; returns what the export records
    (empty for a model without quantized layers). Raises :class:`ExportError` naming the fix."""
    if int8_compute not in INT8_COMPUTE:
        raise ExportError(f"int8_compute must be one of {INT8_COMPUTE}, got {int8_compute!r}")
    if int4_accuracy_level is not None and int(int4_accuracy_level) not in INT4_ACCURACY_LEVELS:
        raise ExportError(f"int4_accuracy_level must be one of {INT4_ACCURACY_LEVELS}, got {int4_accuracy_level!r}")
    if not is_quantized_model(model):
        return {}
    from rocket_deploy.quant_linear import QuantDenseLinear, QuantRocketLinear
    fmts = set()
    for m in model.modules():
        if isinstance(m, QuantRocketLinear):
            fmts |= {m.u_fmt, m.v_fmt}
        elif isinstance(m, QuantDenseLinear):
            fmts.add(m.fmt)
    weight_fmts = {m.u_fmt if isinstance(m, QuantRocketLinear) else m.fmt for m in model.modules()
                   if isinstance(m, (QuantRocketLinear, QuantDenseLinear))}
    v_fmts = {m.v_fmt for m in model.modules() if isinstance(m, QuantRocketLinear)}
    if target == "trt":
        if int8_compute != "weight-only" or int4_accuracy_level not in (None, 0):
            raise ExportError("--int8-compute / --int4-accuracy-level apply to --target ort only; the trt graph is "
                              "weight-only (TensorRT picks its kernels)")
        compute = [f"{f} DequantizeLinear -> MatMul" if f != "int4" else
                   "int4 INT4 blocked DequantizeLinear -> MatMul + zero-point correction" for f in sorted(weight_fmts)]
        if v_fmts:
            compute.append(f"V {'/'.join(sorted(v_fmts))} codes + scales -> RocketSparseVMatMul")
        return {"formats": sorted(fmts), "activations_quantized": False, "compute": "; ".join(compute)}
    level = DEFAULT_INT4_ACCURACY_LEVEL if int4_accuracy_level is None else int(int4_accuracy_level)
    if int8_compute == "dynamic" and dtype != "fp32":
        raise ExportError("--int8-compute dynamic needs --dtype fp32 (ONNX Runtime's dynamic int8 MatMul kernels "
                          "take float32 activations); use --int8-compute weight-only for fp16")
    dynamic = int8_compute == "dynamic" and "int8" in weight_fmts
    compute = []
    if "int4" in weight_fmts:
        compute.append(f"int4 MatMulNBits accuracy_level {level}")
    if "int8" in weight_fmts:
        compute.append("int8 DequantizeLinear -> MatMul (dynamic int8)" if dynamic else "int8 weight-only (folded)")
    if "fp8" in weight_fmts:
        compute.append("fp8 LUT weight-only (folded)")
    if fmts - weight_fmts:
        compute.append(f"V {'/'.join(sorted(fmts - weight_fmts))} folded")
    out = {"formats": sorted(fmts), "int8_compute": int8_compute,
           "activations_quantized": bool(("int4" in weight_fmts and level == 4) or dynamic),
           "compute": "; ".join(compute)}
    if "int4" in fmts:
        out["int4_accuracy_level"] = level
    return out


def check_onnx(path: str, target: str) -> None:
    """``onnx.checker`` on the saved graph; the ``rocket`` domain op is registered first (trt target)."""
    import onnx
    from .schema import register_rocket_schema
    register_rocket_schema()
    try:
        onnx.checker.check_model(path, full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph ({target} target): {e}") from e


def export_artifact(artifact: str, out_dir: str, *, target: str = "ort", dtype: str = "fp32", **kw) -> ExportResult:
    """Load a ROCKET artifact (fp32) and export it (see :func:`export_model`)."""
    from rocket_deploy.artifact import load_artifact, read_manifest
    manifest = read_manifest(artifact)
    model, tokenizer, manifest = load_artifact(artifact, dtype=torch.float32)
    info = {"artifact": os.path.abspath(artifact), "budget": manifest.get("budget", {}).get("target_removed_fraction")}
    return export_model(model, out_dir, target=target, dtype=dtype, tokenizer=tokenizer, extra_info=info, **kw)
