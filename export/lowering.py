"""Graph passes on the exported ONNX model (``onnx_ir``; no 2 GB protobuf limit).

* :func:`lower_rocket_nodes` -- the ``ort`` target: every ``rocket.RocketSparseVMatMul`` node becomes standard ONNX
  ops that rebuild the dense ``V`` (``rank x out_features``) from the packed initializers (``values`` + bitmask)
  and multiply. The expansion only depends on initializers, so ONNX Runtime's constant folding (on by default,
  ``ORT_ENABLE_BASIC`` and above) runs it ONCE when the session is created; each run is then two plain MatMuls.
  The file keeps the packed form (about the artifact's size). Quantized V (``value_type`` 1 / 2, trt graphs of
  ``--quantize`` artifacts, lowered for validation): the int8 / fp8 codes are cast to the activation dtype and V's
  columns multiplied by the ``scales`` input before the product (folded the same way).
* :func:`store_weights_fp16` -- fp32 initializers whose values are exactly representable in fp16 (all weights of a
  ROCKET artifact, which stores fp16) are stored as fp16 plus a ``Cast`` to fp32; folded at session start as well,
  so an fp32 graph costs fp16 bytes on disk and computes in fp32 bit for bit.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rocket_deploy.onnx_contract import ONNX_OP, PLUGIN_DOMAINS


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def rocket_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The ``RocketSparseVMatMul`` nodes of ``graph``, in any of the plugin domains."""
    return [n for n in graph if n.domain in PLUGIN_DOMAINS and n.op_type == ONNX_OP]


def _const(tape, name: str, array: np.ndarray) -> ir.Value:
    return tape.initializer(ir.tensor(array, name=name), name=name)


def lower_rocket_nodes(model: ir.Model, merge: str = "auto") -> dict:
    """Replace ``RocketSparseVMatMul`` nodes by standard ops (see module doc).

    ``merge``: ``"auto"`` multiplies ``U V`` into one dense weight (also folded at session start) for the layers
    whose factorized fp32 form would move at least as many bytes per token as the dense weight
    (``rank * (in + out) >= in * out``), ``"never"`` keeps every layer factorized, ``"always"`` merges all.
    Returns counts of what was done.
    """
    from onnx_ir import tape as ir_tape
    graph = model.graph
    stats = {"lowered": 0, "dense_v": 0, "sparse_v": 0, "merged": 0}
    shared: dict[str, ir.Value] = {}
    for node in rocket_nodes(graph):
        vt = int(_attr(node, "value_type", 0))
        rank, keep, d_out = int(_attr(node, "rank")), int(_attr(node, "keep")), int(_attr(node, "out_features"))
        t, values, mask = node.inputs[0], node.inputs[1], node.inputs[2]
        base = (values.name or node.name).removesuffix(".v_values")
        tp = ir_tape.Tape()
        scales = None
        if vt != 0:         # int8 / fp8 codes: cast exactly to the activation dtype, scale V's columns (folded)
            if len(node.inputs) < 4 or node.inputs[3] is None:
                raise ValueError(f"{node.name}: value_type={vt} needs the 4th input 'scales'")
            act = node.outputs[0].dtype or t.dtype or ir.DataType.FLOAT
            values = tp.op("Cast", [values], {"to": act}, name=f"{base}.v_codes")
            values.dtype = act
            scales = node.inputs[3]
            if scales.dtype != act:
                scales = tp.op("Cast", [scales], {"to": act}, name=f"{base}.v_scales_cast")
                scales.dtype = act
        if keep == rank:
            v = tp.op("Transpose", [values], {"perm": [1, 0]}, name=f"{base}.V")
            stats["dense_v"] += 1
        else:
            nb = (rank + 7) // 8
            if "shifts" not in shared:
                shared["shifts"] = _const(tp, "rocket.bit_shifts", np.arange(8, dtype=np.uint8).reshape(1, 1, 8))
                shared["one_u8"] = _const(tp, "rocket.one_u8", np.ones((1,), dtype=np.uint8))
                shared["axis_m1"] = _const(tp, "rocket.axis_m1", np.array([-1], dtype=np.int64))
                shared["one_i64"] = _const(tp, "rocket.one_i64", np.array(1, dtype=np.int64))
                shared["zero_i64"] = _const(tp, "rocket.zero_i64", np.array(0, dtype=np.int64))
                shared["axis1"] = _const(tp, "rocket.axis1", np.array(1, dtype=np.int64))
                shared["zero1"] = _const(tp, "rocket.slice_start", np.array([0], dtype=np.int64))
                shared["sl_axis"] = _const(tp, "rocket.slice_axis", np.array([1], dtype=np.int64))
            shape = _const(tp, f"{base}.bits_shape", np.array([d_out, nb * 8], dtype=np.int64))
            end = _const(tp, f"{base}.rank", np.array([rank], dtype=np.int64))
            m3 = tp.op("Unsqueeze", [mask, shared["axis_m1"]])
            bits = tp.op("BitwiseAnd", [tp.op("BitShift", [m3, shared["shifts"]], {"direction": "RIGHT"}),
                                        shared["one_u8"]])
            bits = tp.op("Slice", [tp.op("Reshape", [bits, shape]), shared["zero1"], end, shared["sl_axis"]])
            bits_i = tp.op("Cast", [bits], {"to": ir.DataType.INT64})
            pos = tp.op("Max", [tp.op("Sub", [tp.op("CumSum", [bits_i, shared["axis1"]]), shared["one_i64"]]),
                                shared["zero_i64"]])
            gathered = tp.op("GatherElements", [values, pos], {"axis": 1})
            keep_b = tp.op("Cast", [bits], {"to": ir.DataType.BOOL})
            zero = _const(tp, f"{base}.zero", np.zeros((1,), dtype=values.dtype.numpy()))
            vt_dense = tp.op("Where", [keep_b, gathered, zero])
            v = tp.op("Transpose", [vt_dense], {"perm": [1, 0]}, name=f"{base}.V")
            stats["sparse_v"] += 1
        if scales is not None:
            v = tp.op("Mul", [v, scales], name=f"{base}.V_scaled")       # [rank, d_out] * [d_out]
            stats["quant_v"] = stats.get("quant_v", 0) + 1
        u_node = t.producer()
        do_merge = False
        if merge != "never" and u_node is not None and u_node.op_type == "MatMul" and len(t.uses()) == 1:
            u_val = u_node.inputs[1]
            d_in = u_val.shape[0] if u_val.shape is not None and len(u_val.shape) == 2 else None
            x_shape = u_node.inputs[0].shape
            if not isinstance(d_in, int) and x_shape is not None and len(x_shape):
                d_in = x_shape[-1]      # U computed in-graph (quantized, folded at session start): shape from x
            u_src = u_val.producer()
            if u_src is not None and u_src.op_type == "DequantizeLinear":
                d_in = None     # ORT never folds DequantizeLinear: U V would be multiplied on every call
            if isinstance(d_in, int):
                do_merge = merge == "always" or rank * (d_in + d_out) >= d_in * d_out
        if do_merge:
            w = tp.op("MatMul", [u_node.inputs[1], v], name=f"{base}.W")
            y = tp.op("MatMul", [u_node.inputs[0], w], name=f"{base}.matmul")
            stats["merged"] += 1
        else:
            y = tp.op("MatMul", [t, v], name=f"{base}.matmul_v")
        replace_node(graph, node, tp, y)
        if do_merge and not u_node.outputs[0].uses():
            graph.remove(u_node, safe=True)
        stats["lowered"] += 1
    if stats["lowered"]:
        remove_unused_initializers(graph)
        used = {n.domain for n in graph.all_nodes()}
        for domain in set(PLUGIN_DOMAINS) - used:
            graph.opset_imports.pop(domain, None)
            model.opset_imports.pop(domain, None)
    return stats


def replace_node(graph: ir.Graph, node: ir.Node, tape, y: ir.Value) -> None:
    """Replace single-output ``node`` by what ``tape`` built: its nodes go in before ``node``, its initializers that
    the graph lacks are registered, every use of the old output moves to ``y`` (which takes the old output's dtype /
    shape and, where it was a graph output, its name), and ``node`` is removed."""
    out = node.outputs[0]
    if out.dtype is not None:
        y.dtype = out.dtype
    if out.shape is not None:
        y.shape = out.shape
    graph.insert_before(node, tape.nodes)
    for init in tape.initializers:
        if init.name not in graph.initializers:
            graph.register_initializer(init)
    was_output, name = out.is_graph_output(), out.name
    ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
    if was_output:
        out.name, y.name = f"{name}.replaced", name
    graph.remove(node, safe=True)


def remove_unused_initializers(graph: ir.Graph) -> int:
    dead = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()
            and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return len(dead)


def store_weights_fp16(model: ir.Model, min_elements: int = 64) -> dict:
    """fp32 initializers that are exactly fp16 values -> fp16 initializer + Cast(to=FLOAT). Returns byte counts."""
    graph = model.graph
    first = next(iter(graph), None)
    saved = converted = 0
    casts = []
    for name, val in list(graph.initializers.items()):
        if val.dtype != ir.DataType.FLOAT or val.const_value is None or val.is_graph_input():
            continue
        arr = val.const_value.numpy()
        if arr.size < min_elements:
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr, equal_nan=True):
            continue
        new_init = ir.Value(name=name + ".fp16", shape=val.shape, type=ir.TensorType(ir.DataType.FLOAT16),
                            const_value=ir.tensor(half, name=name + ".fp16"))
        graph.register_initializer(new_init)
        cast = ir.Node("", "Cast", [new_init], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                       name=name + ".cast_fp32")
        cast.outputs[0].shape, cast.outputs[0].dtype = val.shape, ir.DataType.FLOAT
        ir.convenience.replace_all_uses_with(val, cast.outputs[0])
        del graph.initializers[name]
        cast.outputs[0].name = name
        casts.append(cast)
        saved += arr.nbytes // 2
        converted += 1
    if casts:
        if first is not None:
            graph.insert_before(first, casts)
        else:
            graph.extend(casts)
    return {"fp16_stored": converted, "bytes_saved": saved}
