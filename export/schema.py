"""ONNX schema of ``RocketSparseVMatMul`` (in every domain of :data:`rocket_deploy.onnx_contract.PLUGIN_DOMAINS`), so
that ``onnx.checker`` and shape inference know the op.

Shape inference: ``y`` has ``t``'s element type and shape with the last dim replaced by ``out_features``; a known
last dim of ``t`` other than ``rank``, or ``value_type != 0`` without the ``scales`` input, is an inference error.
"""
from __future__ import annotations

from rocket_deploy.onnx_contract import ONNX_OP, OP_OPSET_VERSION, PLUGIN_DOMAINS, VALUE_TYPE_SAME

_REGISTERED: set[str] = set()


def _attr_int(ctx, name: str, default: int | None = None) -> int | None:
    a = ctx.get_attribute(name)
    return default if a is None else int(a.i)


def infer_shape(ctx) -> None:
    """Type and shape inference of ``RocketSparseVMatMul`` (see the module doc)."""
    import onnx
    t = ctx.get_input_type(0)
    if t is None or not t.HasField("tensor_type"):
        return
    out_features, rank = _attr_int(ctx, "out_features"), _attr_int(ctx, "rank")
    if _attr_int(ctx, "value_type", VALUE_TYPE_SAME) != VALUE_TYPE_SAME and not (
            ctx.get_num_inputs() > 3 and ctx.has_input(3)):
        raise onnx.shape_inference.InferenceError(
            f"{ONNX_OP}: value_type != {VALUE_TYPE_SAME} needs the 4th input 'scales'")
    y = onnx.TypeProto()
    y.tensor_type.elem_type = t.tensor_type.elem_type
    if t.tensor_type.HasField("shape"):
        dims = list(t.tensor_type.shape.dim)
        if not dims:
            raise onnx.shape_inference.InferenceError(f"{ONNX_OP}: input t must have at least one dim, got a scalar")
        last = dims[-1]
        if last.HasField("dim_value") and rank is not None and last.dim_value != rank:
            raise onnx.shape_inference.InferenceError(
                f"{ONNX_OP}: the last dim of t is {last.dim_value}, the node's rank attribute is {rank}")
        shape = y.tensor_type.shape
        for d in dims[:-1]:
            shape.dim.add().CopyFrom(d)
        shape.dim.add().dim_value = int(out_features)
    ctx.set_output_type(0, y)


def rocket_schema(domain: str = PLUGIN_DOMAINS[0]):
    from onnx import defs
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    AT = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        ONNX_OP, domain, OP_OPSET_VERSION,
        doc="y = t @ V, V (rank x out_features) packed per column: values [out_features, keep] in row order and a "
            "uint8 bitmask [out_features, ceil(rank/8)] (LSB first). value_type 0: values in the activation dtype; "
            "1: int8 + per-column float32 scales; 2: fp8 e4m3 + scales.",
        inputs=[P("t", "T", "activations [..., rank]"),
                P("values", "V", "kept values [out_features, keep]"),
                P("mask", "tensor(uint8)", "bitmask [out_features, ceil(rank/8)]"),
                P("scales", "tensor(float)", "per-column scales [out_features] (value_type != 0)",
                  param_option=defs.OpSchema.FormalParameterOption.Optional)],
        outputs=[P("y", "T", "[..., out_features]")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("V", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int8)",
                                 "tensor(float8e4m3fn)"], "stored values")],
        attributes=[A("rank", AT.INT, "rows of V"), A("keep", AT.INT, "kept rows per column"),
                    A("out_features", AT.INT, "columns of V"),
                    A("value_type", _int_attr(VALUE_TYPE_SAME),
                      "0 = activation dtype, 1 = int8 + scales, 2 = fp8 e4m3 + scales"),
                    A("plugin_version", AT.STRING, "TensorRT plugin version (\"1\")", required=False),
                    A("plugin_namespace", AT.STRING, "TensorRT plugin namespace (\"rocket\")", required=False)],
    )
    schema.set_type_and_shape_inference_function(infer_shape)
    return schema


def _int_attr(v):
    from onnx import helper
    return helper.make_attribute("value_type", v)


def register_rocket_schema(domains: tuple[str, ...] = PLUGIN_DOMAINS) -> None:
    """Register the schema once per process and domain (a domain whose op onnx already knows is left as it is)."""
    from onnx import defs
    for domain in domains:
        if domain in _REGISTERED:
            continue
        try:
            defs.get_schema(ONNX_OP, OP_OPSET_VERSION, domain)
        except defs.SchemaError:
            defs.register_schema(rocket_schema(domain))
        _REGISTERED.add(domain)
