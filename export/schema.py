"""ONNX schema of ``rocket.RocketSparseVMatMul`` so that ``onnx.checker`` (and shape inference) know the op."""
from __future__ import annotations

from rocket_deploy.onnx_contract import ONNX_DOMAIN, ONNX_OP, OP_OPSET_VERSION

_REGISTERED = False


def rocket_schema():
    from onnx import defs
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    AT = defs.OpSchema.AttrType
    return defs.OpSchema(
        ONNX_OP, ONNX_DOMAIN, OP_OPSET_VERSION,
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
                    A("value_type", _int_attr(0), "0 = activation dtype, 1 = int8 + scales, 2 = fp8 e4m3 + scales"),
                    A("plugin_version", AT.STRING, "TensorRT plugin version (\"1\")", required=False),
                    A("plugin_namespace", AT.STRING, "TensorRT plugin namespace (\"rocket\")", required=False)],
    )


def _int_attr(v):
    from onnx import helper
    return helper.make_attribute("value_type", v)


def register_rocket_schema() -> None:
    """Register the schema once per process (no-op if onnx already knows the op)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnx import defs
    try:
        defs.get_schema(ONNX_OP, 1, ONNX_DOMAIN)
    except defs.SchemaError:
        defs.register_schema(rocket_schema())
    _REGISTERED = True
