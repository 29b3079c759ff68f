"""Triton Inference Server model repository for an exported model.

    DIR/<name>/config.pbtxt
    DIR/<name>/1/model.onnx (+ model.onnx.data)        backend onnxruntime   (ort target)
    DIR/<name>/1/model.plan                             backend tensorrt      (a plan built with `rocket-deploy build`)

Dims are written without the batch axis when ``max_batch_size > 0``; our KV-cache decoders use
``max_batch_size: 0`` (the batch is an explicit ``-1`` dim) and no dynamic batching: requests carry their own cache
and cannot be merged by the server. Encoders get dynamic batching.
"""
from __future__ import annotations

import os
import re
import shutil

_TRITON_DTYPES = {"float": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "double": "TYPE_FP64",
                  "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                  "bool": "TYPE_BOOL"}


def _io(model_path: str):
    import onnx
    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def desc(vi):
        tt = vi.type.tensor_type
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type != onnx.TensorProto.BFLOAT16 \
            else "bfloat16"
        dt = {"float32": "float", "float64": "double"}.get(dt, dt)
        dims = [int(d.dim_value) if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return vi.name, _TRITON_DTYPES[dt], dims

    return [desc(v) for v in m.graph.input if v.name not in inits], [desc(v) for v in m.graph.output]


def _block(kind: str, items) -> str:
    entries = []
    for name, dt, dims in items:
        entries.append(f'  {{\n    name: "{name}"\n    data_type: {dt}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def render_config(name: str, model_path: str, backend: str = "onnxruntime", instance_kind: str = "KIND_AUTO",
                  instances: int = 1, max_batch_size: int | None = None) -> str:
    inputs, outputs = _io(model_path)
    decoder = any(n.startswith("past_key_values.") for n, _, _ in inputs)
    if max_batch_size is None:
        max_batch_size = 0 if decoder else 8
    if max_batch_size > 0:
        inputs = [(n, d, dims[1:]) for n, d, dims in inputs]
        outputs = [(n, d, dims[1:]) for n, d, dims in outputs]
    platform = {"onnxruntime": 'backend: "onnxruntime"', "tensorrt": 'platform: "tensorrt_plan"'}[backend]
    text = (f'name: "{name}"\n{platform}\nmax_batch_size: {max_batch_size}\n'
            + _block("input", inputs) + _block("output", outputs)
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: {instance_kind}\n  }}\n]\n")
    if max_batch_size > 0 and not decoder:
        text += "dynamic_batching { }\n"
    if backend == "tensorrt":
        text += 'parameters {\n  key: "plugin"\n  value: { string_value: "librocket_trt_plugins.so (LD_PRELOAD it into tritonserver)" }\n}\n'
    return text


def write_triton_repo(repo_dir: str, model_path: str, name: str | None = None, backend: str = "onnxruntime",
                      instance_kind: str = "KIND_AUTO", instances: int = 1, plan_path: str | None = None,
                      overwrite: bool = False) -> str:
    """Write ``repo_dir/<name>/config.pbtxt`` and ``repo_dir/<name>/1/`` with the model file(s). Returns the model dir.

    ``backend="tensorrt"``: the config's I/O are read from ``model_path`` (the trt-target ONNX); ``plan_path`` is
    copied to ``1/model.plan`` when given, else ``1/BUILD_PLAN.txt`` says how to build it there."""
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.dirname(os.path.abspath(model_path))))
    model_dir = os.path.join(repo_dir, name)
    if os.path.exists(model_dir):
        if not overwrite:
            raise FileExistsError(f"{model_dir} already exists; choose another --triton-repo / name or pass --overwrite")
        shutil.rmtree(model_dir)
    version = os.path.join(model_dir, "1")
    os.makedirs(version)
    if backend == "tensorrt":
        if plan_path:
            if not os.path.isfile(plan_path):
                raise FileNotFoundError(f"no engine at {plan_path!r}; build it with `rocket-deploy build`")
            shutil.copy2(plan_path, os.path.join(version, "model.plan"))
        else:       # engines are GPU- and TensorRT-version specific: build it on the serving machine
            with open(os.path.join(version, "BUILD_PLAN.txt"), "w") as f:
                f.write(f"Build the engine on the Triton machine (same GPU and TensorRT version):\n"
                        f"  rocket-deploy build {os.path.abspath(model_path)} --out {os.path.abspath(version)}/model.plan\n"
                        f"and LD_PRELOAD librocket_trt_plugins.so into tritonserver.\n")
    else:
        src_dir = os.path.dirname(os.path.abspath(model_path))
        shutil.copy2(model_path, os.path.join(version, "model.onnx"))
        import onnx
        m = onnx.load(model_path, load_external_data=False)
        for loc in {e.value for i in m.graph.initializer for e in i.external_data if e.key == "location"}:
            shutil.copy2(os.path.join(src_dir, loc), os.path.join(version, loc))
    with open(os.path.join(model_dir, "config.pbtxt"), "w") as f:
        f.write(render_config(name, model_path, backend, instance_kind, instances))
    return model_dir
