"""Graph passes of the ``trt`` target over the exported ``onnx_ir`` model.

* :func:`prepare_trt_graph` -- quantized graphs: every ``com.microsoft.MatMulNBits`` (int4 weight; not a TensorRT op)
  becomes a symmetric INT4 blocked ``DequantizeLinear -> MatMul`` plus an exact zero-point correction, and the
  default-domain opset is raised to what the graph needs;
* :func:`set_plugin_domain` -- moves the ``RocketSparseVMatMul`` nodes into another domain of
  :data:`rocket_deploy.onnx_contract.PLUGIN_DOMAINS` (``trt.plugins`` for ONNX Runtime's TensorRT execution
  provider, which only hands nodes of that domain to TensorRT plugins);
* :func:`pack_for_ort` -- the ``ort-packed`` target (ONNX Runtime CPU + the ``plugins_ort`` custom-op library, not a
  TensorRT graph): every fp32 weight that is exactly fp16 stays fp16 in the file AND in memory -- ``MatMul`` by a
  weight becomes ``rocket.RocketMatMulF16`` (weight stored [out, in], as a torch Linear), the ``RocketSparseVMatMul``
  values become fp16, an embedding ``Gather`` reads the fp16 table and casts the gathered rows; nothing is left for
  ONNX Runtime's constant folding to upcast at session start. Compute stays fp32 (fp32 accumulation);
* :func:`unpack_for_validation` -- the inverse, in standard ops, for the export's validation session.
"""
from __future__ import annotations

import numpy as np

from rocket_deploy.onnx_contract import (F16_MATMUL_OP, MS_DOMAIN, ONNX_DOMAIN, ONNX_OP, OP_OPSET_VERSION, OPSET,
                                         PLUGIN_DOMAINS, VALUE_TYPE_SAME)

TRT_INT4_OPSET = 21        # DequantizeLinear with INT4 input and block_size
TRT_FP8_OPSET = 19         # DequantizeLinear / Cast with float8, float16 scales


def _unpack_nibbles_np(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[..., n]`` -> ``[..., 2n]`` codes, low nibble first (as :func:`rocket_deploy.quant_format.pack_nibbles`)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def int4_trt_tensors(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, block_size: int):
    """MatMulNBits storage -> the TensorRT form ``W = DQ(W4, S) + G @ ZS`` (exact: ``(c - z) s = (c - 8) s +
    (8 - z) s``), with ``W4 = c - 8`` signed int4 ``[K, N]`` (zero point 0, as TensorRT requires), ``S [nb, N]``
    the block scales along K, ``ZS = (8 - z) s [nb, N]`` (float32; all zero when every zero point is 8) and
    ``G [K, nb]`` the 0/1 block indicator (``x @ G`` = the per-block sums of x). Returns
    ``(w4 int8 [K, N], S float32, ZS float32 or None, G float32)``."""
    n, nb, half = packed.shape
    codes = _unpack_nibbles_np(packed).reshape(n, nb * half * 2)[:, :k]             # [N, K] in 0..15
    w4 = (codes.astype(np.int16) - 8).astype(np.int8).T.copy()                   # [K, N] in -8..7
    sc = scales.astype(np.float32).reshape(n, nb)
    z = _unpack_nibbles_np(zeros)[:, :nb].astype(np.float32)                      # [N, nb]
    zs = ((8.0 - z) * sc).T.copy()                                               # [nb, N]
    g = (np.arange(k)[:, None] // block_size == np.arange(nb)[None, :]).astype(np.float32)
    return w4, sc.T.copy(), (zs if np.any(z != 8) else None), g


def _rewrite_matmul_nbits(graph, node, shared: dict, stats: dict) -> None:
    """One ``MatMulNBits`` -> ``MatMul(x, DequantizeLinear(W4 int4 [K, N], S [nb, N], axis=0, block_size))``
    + ``MatMul(MatMul(x, G), ZS)`` (see :func:`int4_trt_tensors`; the correction is left out when every zero point
    is 8). The file keeps the weight 4-bit (ONNX INT4 packs two per byte)."""
    import ml_dtypes
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape

    from .lowering import replace_node
    a = {k: v.value for k, v in node.attributes.items()}
    k, n, bs = int(a["K"]), int(a["N"]), int(a["block_size"])
    x, packed, scales, zeros = node.inputs[:4]
    consts = [v.const_value if v is not None else None for v in (packed, scales, zeros)]
    if any(c is None for c in consts):
        raise ValueError(f"{node.name}: MatMulNBits weights must be initializers for the trt rewrite")
    w4, sc, zs, g = int4_trt_tensors(*(c.numpy() for c in consts), k, bs)
    act = scales.dtype                                    # the compute dtype (scales are stored in it)
    np_act = act.numpy()
    base = (packed.name or node.name).removesuffix(".u_q").removesuffix(".w_q").removesuffix("_q")
    tp = ir_tape.Tape()
    w_v = tp.initializer(ir.tensor(w4.astype(ml_dtypes.int4), name=f"{base}.q_int4"), name=f"{base}.q_int4")
    s_v = tp.initializer(ir.tensor(sc.astype(np_act), name=f"{base}.q_scales"), name=f"{base}.q_scales")
    wd = tp.op("DequantizeLinear", [w_v, s_v], {"axis": 0, "block_size": bs}, name=f"{base}.dq")
    wd.dtype, wd.shape = act, ir.Shape([k, n])
    y = tp.op("MatMul", [x, wd], name=f"{base}.matmul")
    if zs is not None:
        key = (k, bs, str(act))
        if key not in shared:
            name = f"rocket.int4_blocks_{k}_{bs}_{act.name.lower()}"
            shared[key] = tp.initializer(ir.tensor(g.astype(np_act), name=name), name=name)
        z_v = tp.initializer(ir.tensor(zs.astype(np_act), name=f"{base}.q_zero_corr"), name=f"{base}.q_zero_corr")
        sums = tp.op("MatMul", [x, shared[key]], name=f"{base}.block_sums")
        corr = tp.op("MatMul", [sums, z_v], name=f"{base}.zero_corr")
        y = tp.op("Add", [y, corr], name=f"{base}.int4_out")
        stats["int4_zero_correction"] += 1
    replace_node(graph, node, tp, y)
    stats["int4_dq"] += 1


def prepare_trt_graph(model) -> dict:
    """The trt target's pass for quantized graphs (a no-op for graphs without quantized layers): every
    ``MatMulNBits`` is rewritten (:func:`_rewrite_matmul_nbits`), and the default-domain opset raised to what the
    graph needs -- 21 with INT4 blocked DequantizeLinear, 19 with float8 tensors or float16 DequantizeLinear
    scales, else unchanged (18) -- by the onnxscript version converter. Returns counts."""
    import onnx_ir as ir

    from .lowering import remove_unused_initializers
    graph = model.graph
    stats = {"int4_dq": 0, "int4_zero_correction": 0, "opset": model.opset_imports.get("", OPSET)}
    shared: dict = {}
    for node in [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "MatMulNBits"]:
        _rewrite_matmul_nbits(graph, node, shared, stats)
    if stats["int4_dq"]:
        remove_unused_initializers(graph)
    if not any(nd.domain == MS_DOMAIN for nd in graph.all_nodes()):
        graph.opset_imports.pop(MS_DOMAIN, None)
        model.opset_imports.pop(MS_DOMAIN, None)
    need = stats["opset"]
    if stats["int4_dq"]:
        need = max(need, TRT_INT4_OPSET)
    f8 = {ir.DataType.FLOAT8E4M3FN}
    if any(v.dtype in f8 for v in graph.initializers.values()) or any(
            nd.op_type == "DequantizeLinear" and nd.domain == "" and nd.inputs[1].dtype == ir.DataType.FLOAT16
            for nd in graph.all_nodes()):
        need = max(need, TRT_FP8_OPSET)
    if need != stats["opset"]:
        from onnxscript import version_converter
        version_converter.convert_version(model, need)
        model.opset_imports[""] = need
        graph.opset_imports[""] = need
        stats["opset"] = need
    return stats


def set_plugin_domain(model, domain: str) -> int:
    """Move every ``RocketSparseVMatMul`` node of ``model`` (``onnx_ir``) from :data:`ONNX_DOMAIN` into ``domain``
    (one of :data:`PLUGIN_DOMAINS`) and fix the opset imports. Returns the number of nodes moved."""
    if domain not in PLUGIN_DOMAINS:
        raise ValueError(f"plugin domain must be one of {PLUGIN_DOMAINS}, got {domain!r}")
    if domain == ONNX_DOMAIN:
        return 0
    moved = 0
    for node in model.graph.all_nodes():
        if node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP:
            node.domain = domain
            moved += 1
    if moved:
        for imports in (model.graph.opset_imports, model.opset_imports):
            imports.pop(ONNX_DOMAIN, None)
            imports[domain] = OP_OPSET_VERSION
    return moved


PACK_MIN_ELEMENTS = 1024   # smaller MatMul / Gather weights are left to ONNX Runtime's fp32 kernels


def _exact_fp16(value, min_elements: int) -> np.ndarray | None:
    """The fp16 copy of an fp32 initializer whose every value is exactly an fp16 value (None otherwise)."""
    import onnx_ir as ir
    if value is None or not value.is_initializer() or value.dtype != ir.DataType.FLOAT or value.const_value is None \
            or value.is_graph_input() or value.is_graph_output():
        return None
    arr = value.const_value.numpy()
    if arr.size < min_elements:
        return None
    half = arr.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), arr, equal_nan=True) else None


def pack_for_ort(model, min_elements: int = PACK_MIN_ELEMENTS) -> dict:
    """The ``ort-packed`` pass over a trt-target graph of an unquantized model (see the module doc):

    * ``MatMul(x, W)`` with ``W`` an fp32 initializer ``[K, N]`` (or ``Transpose(E)`` of one ``[N, K]``: the tied
      lm_head) that is exactly fp16 -> ``RocketMatMulF16(x, W^T fp16 [N, K])``;
    * ``RocketSparseVMatMul`` (value_type 0): exact-fp16 ``values`` -> fp16; a dense V (``keep == rank``: the
      mask keeps every row, ``values [out, rank]`` is ``V^T``) -> ``RocketMatMulF16(t, values fp16)``;
    * ``Gather(E, ids)`` (axis 0) on an exact-fp16 table -> ``Cast(Gather(E fp16, ids), float)`` (the table shared
      with a tied lm_head's ``RocketMatMulF16``).

    Weights that are not exactly fp16 are left fp32 (ONNX Runtime's own kernels). Raises ``ValueError`` on a node
    the custom-op library cannot run (quantized V). Returns counts and the bytes of weights kept fp16."""
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape

    from .lowering import remove_unused_initializers, replace_node
    graph = model.graph
    halves: dict[tuple[str, bool], ir.Value] = {}      # (initializer name, transposed) -> fp16 initializer
    stats = {"f16_matmul": 0, "dense_v_f16": 0, "fp16_v_values": 0, "fp16_gather": 0, "fp16_bytes": 0,
             "fp32_weights_left": 0}

    def half_of(value, transpose: bool, least: int = min_elements):
        key = (value.name, transpose)
        if key not in halves:
            arr = _exact_fp16(value, least)
            if arr is None:
                halves[key] = None
            else:
                arr = np.ascontiguousarray(arr.T if transpose else arr)
                name = f"{value.name}.fp16" + (".t" if transpose else "")
                v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.FLOAT16),
                             const_value=ir.tensor(arr, name=name))
                graph.register_initializer(v)
                halves[key] = v
                stats["fp16_bytes"] += arr.nbytes
        return halves[key]

    for node in list(graph):
        if node.domain in PLUGIN_DOMAINS and node.op_type == ONNX_OP:
            a = {k: v.value for k, v in node.attributes.items()}
            if int(a.get("value_type", VALUE_TYPE_SAME)) != VALUE_TYPE_SAME:
                raise ValueError(f"{node.name}: the ort-packed target runs value_type 0 only (quantized V: export "
                                 f"with --target ort or trt)")
            h = half_of(node.inputs[1], False, 1)       # the op's own input: fp16 at any size
            if h is None:
                continue
            if int(a["keep"]) == int(a["rank"]):        # dense V: values [out, rank] is V^T, a Linear weight
                tp = ir_tape.Tape()
                y = tp.op(F16_MATMUL_OP, [node.inputs[0], h], {"in_features": int(a["rank"]),
                                                               "out_features": int(a["out_features"])},
                          domain=ONNX_DOMAIN, name=f"{node.name or 'sparse_v'}.dense_v_f16_{stats['dense_v_f16']}")
                replace_node(graph, node, tp, y)
                stats["dense_v_f16"] += 1
                stats["f16_matmul"] += 1
            else:
                node.replace_input_with(1, h)
                stats["fp16_v_values"] += 1
        elif node.domain == "" and node.op_type == "MatMul":
            x, w = node.inputs
            src = w.producer() if w is not None else None
            if src is not None and src.op_type == "Transpose" and src.domain == "" and \
                    list(src.attributes.get("perm").value if src.attributes.get("perm") else [1, 0]) == [1, 0]:
                w16 = half_of(src.inputs[0], False)              # E [N, K] is already the layout the op reads
            elif w is not None and w.is_initializer() and w.shape is not None and len(w.shape) == 2:
                w16 = half_of(w, True)                           # W [K, N] -> [N, K]
            else:
                continue
            if w16 is None or x.dtype not in (None, ir.DataType.FLOAT):
                stats["fp32_weights_left"] += 1
                continue
            n, k = (int(d) for d in w16.shape)
            tp = ir_tape.Tape()
            y = tp.op(F16_MATMUL_OP, [x, w16], {"in_features": k, "out_features": n}, domain=ONNX_DOMAIN,
                      name=f"{node.name or 'matmul'}.f16_{stats['f16_matmul']}")
            replace_node(graph, node, tp, y)
            if src is not None and src.op_type == "Transpose" and not src.outputs[0].uses():
                graph.remove(src, safe=True)
            stats["f16_matmul"] += 1
        elif node.domain == "" and node.op_type == "Gather":
            axis = node.attributes.get("axis")
            if axis is not None and int(axis.value) != 0:
                continue
            e16 = half_of(node.inputs[0], False)
            if e16 is None:
                continue
            tp = ir_tape.Tape()
            base = f"{node.name or 'gather'}.fp16_{stats['fp16_gather']}"
            g = tp.op("Gather", [e16, node.inputs[1]], {"axis": 0}, name=base)
            g.dtype = ir.DataType.FLOAT16
            y = tp.op("Cast", [g], {"to": ir.DataType.FLOAT}, name=f"{base}.cast_fp32")
            replace_node(graph, node, tp, y)
            stats["fp16_gather"] += 1
    remove_unused_initializers(graph)
    if stats["f16_matmul"]:
        for imports in (graph.opset_imports, model.opset_imports):
            imports.setdefault(ONNX_DOMAIN, OP_OPSET_VERSION)
    return stats


def unpack_for_validation(model) -> int:
    """Undo :func:`pack_for_ort` in standard ops, for a plain ONNX Runtime session (the export's validation):
    ``RocketMatMulF16(x, W)`` -> ``MatMul(x, Transpose(Cast(W)))`` and fp16 ``RocketSparseVMatMul`` values ->
    ``Cast`` (both folded by ONNX Runtime at session start; :func:`rocket_deploy.export.lowering.lower_rocket_nodes`
    then lowers the sparse nodes). Returns the nodes rewritten."""
    import onnx_ir as ir
    from onnx_ir import tape as ir_tape

    from .lowering import replace_node
    graph = model.graph
    done = 0
    for node in list(graph):
        base = f"{node.name or 'node'}.unpacked_{done}"
        if node.domain in PLUGIN_DOMAINS and node.op_type == F16_MATMUL_OP:
            tp = ir_tape.Tape()
            w = tp.op("Cast", [node.inputs[1]], {"to": ir.DataType.FLOAT}, name=f"{base}.w_fp32")
            w.dtype = ir.DataType.FLOAT
            wt = tp.op("Transpose", [w], {"perm": [1, 0]}, name=f"{base}.w_t")
            wt.dtype = ir.DataType.FLOAT
            y = tp.op("MatMul", [node.inputs[0], wt], name=f"{base}.matmul")
            replace_node(graph, node, tp, y)
            done += 1
        elif node.domain in PLUGIN_DOMAINS and node.op_type == ONNX_OP and \
                node.inputs[1].dtype == ir.DataType.FLOAT16 and node.inputs[0].dtype in (None, ir.DataType.FLOAT):
            tp = ir_tape.Tape()
            v = tp.op("Cast", [node.inputs[1]], {"to": ir.DataType.FLOAT}, name=f"{base}.values_fp32")
            v.dtype, v.shape = ir.DataType.FLOAT, node.inputs[1].shape
            graph.insert_before(node, tp.nodes)
            node.replace_input_with(1, v)
            done += 1
    return done
