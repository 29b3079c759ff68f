"""Tiny ONNX graphs for the TensorRT backend tests, with their numpy references.

* :func:`tiny_decoder` -- the Optimum decoder I/O (``past_key_values.{i}.key|value`` in, ``present.*`` out) with
  simple, exactly known arithmetic (:func:`reference_decoder`);
* :func:`tiny_encoder`, :func:`tiny_matmul` -- an encoder and a graph with an input outside the LLM convention;
* :func:`rocket_layer_onnx` -- one RocketLinear exported by the exporter itself (``export_layer``, target ``trt``), so
  the ``RocketSparseVMatMul`` node is exactly what ``rocket-deploy export --target trt`` writes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rocket_deploy.onnx_contract import past_for_present, past_name, present_name

KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 2, 8, 32, 2


def _model(nodes, inputs, outputs, inits, opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _decoder_weights(seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, KV_HEADS * HEAD_DIM)).astype(np.float32)
    w = rng.standard_normal((KV_HEADS * HEAD_DIM, VOCAB)).astype(np.float32)
    return emb, w


def tiny_decoder(path: Path, batch_dim="batch", layers=LAYERS) -> Path:
    """A decoder with the Optimum KV I/O names. logits = emb(ids) @ W + position_ids + sum(mask) + sum(present.0.key);
    present.i.key = concat(past, kv), present.i.value = concat(past, 2 kv) with kv = emb(ids) as [b, h, s, d]."""
    emb, w = _decoder_weights()
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, [batch_dim, "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, [batch_dim, "total"]),
              helper.make_tensor_value_info("position_ids", i64, [batch_dim, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f, [batch_dim, "seq", VOCAB])]
    inits = [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "kv_shape"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([-1], np.int64), "ax_last"),
             numpy_helper.from_array(np.array([1, 2, 3], np.int64), "ax123"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "ax12")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Reshape", ["emb", "kv_shape"], ["kv4"]),
             helper.make_node("Transpose", ["kv4"], ["kv"], perm=[0, 2, 1, 3]),
             helper.make_node("Mul", ["kv", "two"], ["kv2"])]
    for i in range(layers):
        for kind, src in (("key", "kv"), ("value", "kv2")):
            inputs.append(helper.make_tensor_value_info(past_name(i, kind), f,
                                                        [batch_dim, KV_HEADS, "past", HEAD_DIM]))
            outputs.append(helper.make_tensor_value_info(present_name(i, kind), f,
                                                         [batch_dim, KV_HEADS, "total", HEAD_DIM]))
            nodes.append(helper.make_node("Concat", [past_name(i, kind), src], [present_name(i, kind)], axis=2))
    nodes += [helper.make_node("MatMul", ["emb", "W"], ["proj"]),
              helper.make_node("Cast", ["position_ids"], ["pos_f"], to=f),
              helper.make_node("Unsqueeze", ["pos_f", "ax_last"], ["pos3"]),
              helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f),
              helper.make_node("ReduceSum", ["mask_f", "ax1"], ["mask_sum"], keepdims=1),
              helper.make_node("Unsqueeze", ["mask_sum", "ax_last"], ["mask3"]),
              helper.make_node("ReduceSum", ["present.0.key", "ax123"], ["key_sum"], keepdims=0),
              helper.make_node("Unsqueeze", ["key_sum", "ax12"], ["key3"]),
              helper.make_node("Add", ["proj", "pos3"], ["l1"]),
              helper.make_node("Add", ["l1", "mask3"], ["l2"]),
              helper.make_node("Add", ["l2", "key3"], ["logits"])]
    model = _model(nodes, inputs, outputs, inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference_decoder(ids, mask, pos, past):
    """numpy twin of :func:`tiny_decoder`. ``past``: {name: array} or None."""
    emb, w = _decoder_weights()
    b, s = ids.shape
    e = emb[ids]                                                       # [b, s, h*d]
    kv = e.reshape(b, s, KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    present = {}
    for i in range(LAYERS):
        for kind, src in (("key", kv), ("value", 2 * kv)):
            p = past[past_name(i, kind)] if past else np.zeros((b, KV_HEADS, 0, HEAD_DIM), np.float32)
            present[present_name(i, kind)] = np.concatenate([p, src], axis=2)
    logits = (e @ w + pos[..., None].astype(np.float32) + mask.sum(1).astype(np.float32)[:, None, None]
              + present["present.0.key"].sum(axis=(1, 2, 3))[:, None, None])
    return logits.astype(np.float32), present


def tiny_encoder(path: Path) -> Path:
    i64, f = TensorProto.INT64, TensorProto.FLOAT
    emb = np.random.default_rng(1).standard_normal((VOCAB, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=f),
             helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["last_hidden_state"])]
    model = _model(nodes,
                   [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
                    helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"])],
                   [helper.make_tensor_value_info("last_hidden_state", f, ["batch", "seq", 16])],
                   [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_matmul(path: Path, weight: np.ndarray) -> Path:
    f = TensorProto.FLOAT
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                   [helper.make_tensor_value_info("x", f, ["batch", "rows", weight.shape[0]])],
                   [helper.make_tensor_value_info("y", f, ["batch", "rows", weight.shape[1]])],
                   [numpy_helper.from_array(weight, "W")])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def past_from_present(present: dict) -> dict:
    """``{present.i.kind: array}`` -> ``{past_key_values.i.kind: array}`` (the next step's feeds)."""
    return {past_for_present(n): v for n, v in present.items()}


# rank 60 is not a multiple of 8: the mask has ceil(60 / 8) = 8 bytes per column, the last one half used
ROCKET_LAYER = dict(d_in=32, rank=60, keep=20, d_out=24)


@functools.lru_cache(maxsize=4)
def _exported_rocket_layer(d_in: int, rank: int, keep: int, d_out: int, seed: int) -> tuple[bytes, tuple]:
    import onnx_ir as ir
    import torch
    from _rocket_fixtures import random_sparse_v

    from rocket_deploy.export.driver import export_layer
    from rocket_deploy.rocket_linear import RocketLinear
    v, keep_mask = random_sparse_v(rank, d_out, keep, seed)
    g = torch.Generator().manual_seed(seed + 1)
    u, bias = torch.randn(d_in, rank, generator=g), torch.randn(d_out, generator=g)
    layer = RocketLinear.from_factors(u, v, keep_mask, bias=bias).eval()
    model, _ = export_layer(layer, torch.zeros(2, d_in), target="trt", dtype="fp32")
    weights = (u.numpy(), v.numpy(), bias.numpy())
    return ir.to_proto(model).SerializeToString(), weights


def rocket_layer_onnx(path: Path, seed: int = 0, **shape) -> tuple[Path, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One RocketLinear (``y = x @ U @ V + b``, V packed) exported for TensorRT by the exporter; returns the file
    and ``(U, dense V, b)``. The graph input is ``x [batch_size, d_in]``, the output ``y``."""
    dims = {**ROCKET_LAYER, **shape}
    blob, weights = _exported_rocket_layer(dims["d_in"], dims["rank"], dims["keep"], dims["d_out"], seed)
    path = Path(path)
    path.write_bytes(blob)
    return path, weights


@pytest.fixture
def decoder_onnx(tmp_path):
    return tiny_decoder(tmp_path / "model.onnx")
