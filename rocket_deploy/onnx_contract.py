"""The ONNX contract between export and the runtimes: one place for every name both sides must agree on.

* the custom op for the sparse V product (``rocket.RocketSparseVMatMul``, the TensorRT plugin's creator name,
  namespace and version, its attributes and the ``value_type`` codes) and the domains it may sit in (``rocket``;
  ``trt.plugins`` for ONNX Runtime's TensorRT execution provider);
* the export targets and dtypes, the file names of an export folder, the keys of ``export.json`` and of the
  model's ``metadata_props``;
* the I/O names (Optimum's: ``past_key_values.{i}.key|value`` in, ``present.{i}.key|value`` out; encoders'
  ``token_type_ids``), the patterns that parse them back, and the dynamic dim names (``batch_size``,
  ``sequence_length``, ``past_sequence_length``, ``total_sequence_length``);
* :func:`onnx_file_bytes`, the on-disk size of an exported graph with its external data.

Export writes graphs that follow this contract; ``runtime`` (ONNX Runtime, TensorRT) reads them through it. Neither
imports the other.
"""
from __future__ import annotations

import os
import re

# --- the custom op ---------------------------------------------------------------------------------------------
ONNX_DOMAIN = "rocket"                 # the ONNX node's domain (TensorRT's parser looks plugins up by op type)
# ONNX Runtime's TensorRT execution provider hands only nodes of this domain to TensorRT plugins.
ORT_TRT_PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_DOMAINS = (ONNX_DOMAIN, ORT_TRT_PLUGIN_DOMAIN)   # where an exported graph may hold the node (default first)
ONNX_OP = "RocketSparseVMatMul"        # node op type == the plugin creator's name
PLUGIN_NAME = ONNX_OP
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "rocket"
TORCH_OP = "rocket::sparse_v_matmul"   # the torch custom op the exporter traces and translates to the node
OP_OPSET_VERSION = 1                   # the domain's opset version in exported graphs
# Attributes of the node (all ints but the two plugin strings). ``parseFields`` of the plugin requires the ints.
OP_INT_ATTRIBUTES = ("rank", "keep", "out_features", "value_type")
OP_STRING_ATTRIBUTES = ("plugin_version", "plugin_namespace")
# value_type: how the ``values`` input is stored. 1 and 2 take a 4th input, float32 per-column scales.
VALUE_TYPES = {0: "same as activations", 1: "int8 + per-column scales", 2: "fp8 e4m3 + per-column scales"}
VALUE_TYPE_SAME, VALUE_TYPE_INT8, VALUE_TYPE_FP8 = 0, 1, 2
# The ``ort-packed`` target (ONNX Runtime CPU with the plugins_ort custom-op library; not a TensorRT graph): the
# dense products read fp16 weights in the torch Linear layout, ``RocketMatMulF16(x float32 [..., in_features],
# w float16 [out_features, in_features]) -> float32 [..., out_features]`` (domain ``rocket``), and the
# ``RocketSparseVMatMul`` nodes take fp16 ``values`` with float32 activations (value_type 0).
F16_MATMUL_OP = "RocketMatMulF16"
F16_MATMUL_INT_ATTRIBUTES = ("in_features", "out_features")
ORT_LIBRARY_OPS = (ONNX_OP, F16_MATMUL_OP)   # the ops of the ONNX Runtime CPU custom-op library (plugins_ort)

# Microsoft contrib ops (MatMulNBits for int4 weights on the ort target).
MS_DOMAIN = "com.microsoft"

# --- the export folder -----------------------------------------------------------------------------------------
OPSET = 18
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXPORT_INFO = "export.json"
# ort: standard ops (+ com.microsoft); trt: the plugin node kept; ort-packed: the trt graph with fp16 weights kept
# fp16 in memory by the ONNX Runtime custom-op library (RocketMatMulF16 + RocketSparseVMatMul, fp32 compute)
ORT_PACKED_TARGET = "ort-packed"
EXPORT_TARGETS = ("ort", "trt", ORT_PACKED_TARGET)
EXPORT_DTYPES = ("fp32", "fp16", "bf16")   # the compute dtype carried in the graph
# Keys of export.json that runtimes read (the rest is report material).
INFO_TARGET = "target"                 # one of EXPORT_TARGETS
INFO_DTYPE = "dtype"                   # one of EXPORT_DTYPES
INFO_IS_DECODER = "is_decoder"
INFO_INPUTS = "input_names"
INFO_OUTPUTS = "output_names"
INFO_FILE_BYTES = "file_bytes"
INFO_VALIDATION = "validation"
INFO_PATH = "path"
INFO_STATS = "stats"
INFO_SECONDS = "seconds"
INFO_EXTERNAL_DATA = "external_data"
INFO_PLUGIN_DOMAIN = "plugin_domain"   # trt target: the domain of the RocketSparseVMatMul nodes
# metadata_props of the exported ModelProto
META_TARGET, META_DTYPE, META_IS_DECODER = "rocket.target", "rocket.dtype", "rocket.is_decoder"
META_PLUGIN_DOMAIN = "rocket.plugin_domain"
PRODUCER_NAME = "rocket-deploy"

# --- I/O names -------------------------------------------------------------------------------------------------
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "position_ids", "token_type_ids"
LOGITS, LAST_HIDDEN_STATE = "logits", "last_hidden_state"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
KV_KINDS = ("key", "value")
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")
# Dynamic dimension names (Optimum's).
DIM_BATCH, DIM_SEQ, DIM_PAST, DIM_TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def past_name(layer: int, kind: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def past_names(n_layers: int) -> list[str]:
    return [past_name(i, k) for i in range(n_layers) for k in KV_KINDS]


def present_names(n_layers: int) -> list[str]:
    return [present_name(i, k) for i in range(n_layers) for k in KV_KINDS]


def present_for_past(name: str) -> str:
    """``past_key_values.3.key`` -> ``present.3.key`` (the output that feeds that input next step)."""
    m = PAST_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a past_key_values.N.key|value input name")
    return present_name(int(m.group(1)), m.group(2))


def past_for_present(name: str) -> str:
    m = PRESENT_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a present.N.key|value output name")
    return past_name(int(m.group(1)), m.group(2))


def decoder_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layers)], [LOGITS, *present_names(n_layers)]


def encoder_io_names(token_type_ids: bool = False) -> tuple[list[str], list[str]]:
    ins = [INPUT_IDS, ATTENTION_MASK] + ([TOKEN_TYPE_IDS] if token_type_ids else [])
    return ins, [LAST_HIDDEN_STATE]


def model_path(path: str) -> str:
    """An export folder (or the ``.onnx`` file itself) -> the ``.onnx`` file."""
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def is_export_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_FILE))


def onnx_file_bytes(path: str) -> int:
    """Bytes of an ONNX file plus every external-data file it references."""
    import onnx
    total = os.path.getsize(path)
    m = onnx.load(path, load_external_data=False)
    files = set()
    for init in m.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                files.add(e.value)
    d = os.path.dirname(os.path.abspath(path))
    return total + sum(os.path.getsize(os.path.join(d, f)) for f in files if os.path.isfile(os.path.join(d, f)))
