"""Graph passes of the ``trt`` target over the exported ``onnx_ir`` model.

* :func:`prepare_trt_graph` -- quantized graphs: every ``com.microsoft.MatMulNBits`` (int4 weight; not a TensorRT op)
  becomes a symmetric INT4 blocked ``DequantizeLinear -> MatMul`` plus an exact zero-point correction, and the
  default-domain opset is raised to what the graph needs;
* :func:`set_plugin_domain` -- moves the ``RocketSparseVMatMul`` nodes into another domain of
  :data:`rocket_deploy.onnx_contract.PLUGIN_DOMAINS` (``trt.plugins`` for ONNX Runtime's TensorRT execution
  provider, which only hands nodes of that domain to TensorRT plugins).
"""
from __future__ import annotations

import numpy as np

from rocket_deploy.onnx_contract import MS_DOMAIN, ONNX_DOMAIN, ONNX_OP, OP_OPSET_VERSION, OPSET, PLUGIN_DOMAINS

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
