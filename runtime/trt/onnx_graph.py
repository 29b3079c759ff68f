"""What the TensorRT build needs to know about an ONNX graph, read with the ``onnx`` package (no TensorRT, no
external weights loaded): its real inputs (:class:`GraphInput`) and whether it holds the plugin's op."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from rocket_deploy.onnx_contract import ONNX_OP


@dataclasses.dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str                          # numpy dtype name ("int64", "float16", ...)
    dims: tuple[int | str | None, ...]  # int: static; str: symbolic (dim_param); None: unknown

    @property
    def rank(self) -> int:
        return len(self.dims)


def load_graph(model_or_path):
    """A ``ModelProto`` as is, or one read from a path without its external data."""
    if not isinstance(model_or_path, (str, os.PathLike)):
        return model_or_path
    import onnx  # noqa: PLC0415
    path = Path(model_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(path)!r}")
    return onnx.load(str(path), load_external_data=False)


def read_onnx_inputs(onnx_path: str | os.PathLike) -> list[GraphInput]:
    """The real (non-initializer) inputs of an ONNX model file."""
    return graph_inputs(load_graph(Path(onnx_path)))


def graph_inputs(model) -> list[GraphInput]:
    """The real inputs of a ``ModelProto`` (older exporters also list initializers among the inputs)."""
    from onnx import helper  # noqa: PLC0415
    inits = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except Exception:  # noqa: BLE001 -- bfloat16 / float8 have no numpy dtype
            dtype = str(helper.tensor_dtype_to_string(tt.elem_type)).replace("TensorProto.", "").lower()
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(str(d.dim_param))
            else:
                dims.append(None)
        out.append(GraphInput(vi.name, dtype, tuple(dims)))
    return out


def onnx_uses_op(model_or_path, op_type: str = ONNX_OP) -> bool:
    """Whether the graph (subgraphs and local functions included) has a node of ``op_type`` -- by default the plugin's
    op, whatever its domain (TensorRT's parser looks plugins up by op type)."""
    import onnx  # noqa: PLC0415
    model = load_graph(model_or_path)

    def walk(graph) -> bool:
        for node in graph.node:
            if node.op_type == op_type:
                return True
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH and walk(attr.g):
                    return True
                if attr.type == onnx.AttributeProto.GRAPHS and any(walk(g) for g in attr.graphs):
                    return True
        return False

    return walk(model.graph) or any(n.op_type == op_type for f in model.functions for n in f.node)
