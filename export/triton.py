"""Triton Inference Server model repository for an exported model.

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx (+ model.onnx.data)        backend onnxruntime   (ort target)
    DIR/<name>/1/model.plan                             backend tensorrt      (a plan built with `rocket-deploy build`)

``config.pbtxt`` is a protobuf text-format ``inference.ModelConfig``. :func:`model_config_class` builds the subset
of Triton's ``model_config.proto`` we write (same package, message, field names and numbers: name, platform,
backend, max_batch_size, input / output {name, data_type TYPE_*, dims}, instance_group {count, kind},
dynamic_batching, parameters {key, value {string_value}}) with ``google.protobuf``'s descriptor API, and
``text_format`` renders it -- so any model or tensor name is escaped as protobuf requires and Triton parses it back.

Dims are written without the batch axis when ``max_batch_size > 0``; our KV-cache decoders use
``max_batch_size: 0`` (the batch is an explicit ``-1`` dim) and no dynamic batching: requests carry their own cache
and cannot be merged by the server. Encoders get dynamic batching.
"""
from __future__ import annotations

import functools
import os
import re
import shutil

from rocket_deploy.onnx_contract import MODEL_FILE, PAST_PREFIX

PLAN_FILE = "model.plan"
CONFIG_FILE = "config.pbtxt"
PLUGIN_LIBRARY = "librocket_trt_plugins.so"
DATA_TYPES = ("TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
              "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
              "TYPE_BF16")                                              # Triton's DataType enum, values 0..14
INSTANCE_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")   # ModelInstanceGroup.Kind, values 0..3
BACKENDS = ("onnxruntime", "tensorrt")
_ONNX_TO_TRITON = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
                   "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "INT16": "TYPE_INT16", "INT8": "TYPE_INT8",
                   "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32", "UINT64": "TYPE_UINT64",
                   "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING"}


@functools.lru_cache(maxsize=1)
def model_config_class():
    """The ``inference.ModelConfig`` message class (the subset above), in a private descriptor pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="rocket_deploy/triton_model_config.proto", package="inference",
                                           syntax="proto2")      # explicit presence: max_batch_size: 0 is written

    def enum(parent, name, values):
        e = parent.enum_type.add(name=name)
        for i, v in enumerate(values):
            e.value.add(name=v, number=i)

    def field(msg, name, number, ftype, type_name=None, repeated=False, oneof=None):
        fd = msg.field.add(name=name, number=number, type=ftype,
                           label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
        if type_name:
            fd.type_name = type_name
        if oneof is not None:
            fd.oneof_index = oneof

    enum(f, "DataType", DATA_TYPES)
    inp = f.message_type.add(name="ModelInput")
    field(inp, "name", 1, F.TYPE_STRING)
    field(inp, "data_type", 2, F.TYPE_ENUM, ".inference.DataType")
    field(inp, "dims", 4, F.TYPE_INT64, repeated=True)
    out = f.message_type.add(name="ModelOutput")
    field(out, "name", 1, F.TYPE_STRING)
    field(out, "data_type", 2, F.TYPE_ENUM, ".inference.DataType")
    field(out, "dims", 3, F.TYPE_INT64, repeated=True)
    group = f.message_type.add(name="ModelInstanceGroup")
    enum(group, "Kind", INSTANCE_KINDS)
    field(group, "name", 1, F.TYPE_STRING)
    field(group, "count", 2, F.TYPE_INT32)
    field(group, "kind", 4, F.TYPE_ENUM, ".inference.ModelInstanceGroup.Kind")
    f.message_type.add(name="ModelDynamicBatching")
    param = f.message_type.add(name="ModelParameter")
    field(param, "string_value", 1, F.TYPE_STRING)
    cfg = f.message_type.add(name="ModelConfig")
    entry = cfg.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, ".inference.ModelParameter")
    cfg.oneof_decl.add(name="scheduling_choice")
    field(cfg, "name", 1, F.TYPE_STRING)
    field(cfg, "platform", 2, F.TYPE_STRING)
    field(cfg, "max_batch_size", 4, F.TYPE_INT32)
    field(cfg, "input", 5, F.TYPE_MESSAGE, ".inference.ModelInput", repeated=True)
    field(cfg, "output", 6, F.TYPE_MESSAGE, ".inference.ModelOutput", repeated=True)
    field(cfg, "instance_group", 7, F.TYPE_MESSAGE, ".inference.ModelInstanceGroup", repeated=True)
    field(cfg, "dynamic_batching", 11, F.TYPE_MESSAGE, ".inference.ModelDynamicBatching", oneof=0)
    field(cfg, "parameters", 14, F.TYPE_MESSAGE, ".inference.ModelConfig.ParametersEntry", repeated=True)
    field(cfg, "backend", 17, F.TYPE_STRING)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def _io(model_path: str):
    """``([(name, TYPE_*, dims)], [...])`` of the graph's inputs (initializers excluded) and outputs; -1 = dynamic."""
    import onnx
    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def desc(vi):
        tt = vi.type.tensor_type
        dt = onnx.TensorProto.DataType.Name(tt.elem_type)
        if dt not in _ONNX_TO_TRITON:
            raise ValueError(f"{model_path}: {vi.name!r} has ONNX type {dt}, which Triton has no TYPE_* for")
        dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return vi.name, _ONNX_TO_TRITON[dt], dims

    return [desc(v) for v in m.graph.input if v.name not in inits], [desc(v) for v in m.graph.output]


def model_config(name: str, model_path: str, backend: str = "onnxruntime", instance_kind: str = "KIND_AUTO",
                 instances: int = 1, max_batch_size: int | None = None):
    """The ``ModelConfig`` message for the exported graph at ``model_path`` (see the module doc)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance_kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    inputs, outputs = _io(model_path)
    decoder = any(n.startswith(PAST_PREFIX) for n, _, _ in inputs)
    if max_batch_size is None:
        max_batch_size = 0 if decoder else 8
    cut = 1 if max_batch_size > 0 else 0                 # batched models: dims without the batch axis
    cfg = model_config_class()(name=name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        cfg.backend = "onnxruntime"
    else:
        cfg.platform = "tensorrt_plan"
    for rep, items in ((cfg.input, inputs), (cfg.output, outputs)):
        for n, dt, dims in items:
            rep.add(name=n, data_type=dt, dims=dims[cut:])
    cfg.instance_group.add(count=instances, kind=instance_kind)
    if max_batch_size > 0 and not decoder:
        cfg.dynamic_batching.SetInParent()
    if backend == "tensorrt":
        cfg.parameters["plugin"].string_value = f"{PLUGIN_LIBRARY} (LD_PRELOAD it into tritonserver)"
    return cfg


def render_config(name: str, model_path: str, backend: str = "onnxruntime", instance_kind: str = "KIND_AUTO",
                  instances: int = 1, max_batch_size: int | None = None) -> str:
    """``config.pbtxt`` text: :func:`model_config` in protobuf text format."""
    from google.protobuf import text_format
    return text_format.MessageToString(model_config(name, model_path, backend, instance_kind, instances,
                                                    max_batch_size), as_utf8=True)


def parse_config(text: str):
    """A ``config.pbtxt`` text back into the ``ModelConfig`` message (fields outside our subset are an error)."""
    from google.protobuf import text_format
    return text_format.Parse(text, model_config_class()())


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"Triton model name {name!r} cannot be a folder name (it must be non-empty, without '/'); "
                         f"pass another --triton-name")


def write_triton_repo(repo_dir: str, model_path: str, name: str | None = None, backend: str = "onnxruntime",
                      instance_kind: str = "KIND_AUTO", instances: int = 1, plan_path: str | None = None,
                      overwrite: bool = False) -> str:
    """Write ``repo_dir/<name>/config.pbtxt`` and ``repo_dir/<name>/1/`` with the model file(s). Returns the model dir.

    ``backend="tensorrt"``: the config's I/O are read from ``model_path`` (the trt-target ONNX); ``plan_path`` is
    copied to ``1/model.plan`` when given, else ``1/BUILD_PLAN.txt`` says how to build it there. An existing
    ``repo_dir/<name>`` is replaced (``overwrite``) only when it is a Triton folder rocket-deploy wrote
    (:mod:`rocket_deploy.safe_io`)."""
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.dirname(os.path.abspath(model_path))))
    _check_name(name)
    from rocket_deploy.safe_io import atomic_directory
    text = render_config(name, model_path, backend, instance_kind, instances)
    if os.path.lexists(os.path.join(repo_dir, name)) and not overwrite:
        raise FileExistsError(f"{os.path.join(repo_dir, name)} already exists; choose another --triton-repo / "
                              f"--triton-name or pass --overwrite")
    # replaced only when it is a Triton folder we wrote (marker file), atomically
    with atomic_directory(os.path.join(repo_dir, name), overwrite, kind="triton", marker=True) as tmp:
        version = os.path.join(tmp, "1")
        os.makedirs(version)
        final_version = os.path.join(os.path.abspath(repo_dir), name, "1")
        if backend == "tensorrt":
            if plan_path:
                if not os.path.isfile(plan_path):
                    raise FileNotFoundError(f"no engine at {plan_path!r}; build it with `rocket-deploy build`")
                shutil.copy2(plan_path, os.path.join(version, PLAN_FILE))
            else:       # engines are GPU- and TensorRT-version specific: build it on the serving machine
                with open(os.path.join(version, "BUILD_PLAN.txt"), "w") as f:
                    f.write(f"Build the engine on the Triton machine (same GPU and TensorRT version):\n"
                            f"  rocket-deploy build {os.path.abspath(model_path)} --out {final_version}/{PLAN_FILE}\n"
                            f"and LD_PRELOAD {PLUGIN_LIBRARY} into tritonserver.\n")
        else:
            src_dir = os.path.dirname(os.path.abspath(model_path))
            shutil.copy2(model_path, os.path.join(version, MODEL_FILE))
            import onnx
            m = onnx.load(model_path, load_external_data=False)
            for loc in {e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"}:
                shutil.copy2(os.path.join(src_dir, loc), os.path.join(version, loc))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(text)
    return os.path.join(repo_dir, name)
