"""The ``RocketSparseVMatMul`` node the exporter writes for ``--target trt`` carries what the TensorRT plugin needs.

TensorRT's ONNX parser looks a plugin up by the node's op type, ``plugin_version`` (default "1") and
``plugin_namespace`` (default ""), and hands the node's attributes to ``createPlugin`` as fields (INT -> kINT32,
STRING -> kCHAR). ``RocketSparseVPluginCreator::parseFields`` (plugins_trt/RocketSparseVPlugin.cpp) then needs the
integer fields it lists as missing, and checks the two strings. The field names, their kinds and the required set
are read from the plugin's source here, so a change on either side fails this test -- without TensorRT or a GPU.
"""
from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from _trt_graphs import ROCKET_LAYER, rocket_layer_onnx
from onnx import AttributeProto, TensorProto, helper

from rocket_deploy.onnx_contract import (OP_INT_ATTRIBUTES, OP_OPSET_VERSION, OP_STRING_ATTRIBUTES, PLUGIN_DOMAINS,
                                         PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, VALUE_TYPE_SAME)

PLUGINS_TRT = Path(__file__).resolve().parents[3] / "plugins_trt"
PLUGIN_CPP, PLUGIN_H = PLUGINS_TRT / "RocketSparseVPlugin.cpp", PLUGINS_TRT / "RocketSparseVPlugin.h"


def plugin_source_contract() -> dict:
    """What parseFields reads, from the C++ source: field names, which are integers, which are required, and the
    plugin's name / version / namespace constants."""
    src = PLUGIN_H.read_text() + PLUGIN_CPP.read_text()
    fields = dict(re.findall(r'constexpr char const\* kFIELD_(\w+)\{"(\w+)"\};', src))        # RANK -> "rank"
    plugin = dict(re.findall(r'constexpr char const\* kPLUGIN_(\w+)\{"(\w+)"\};', src))       # NAME -> "Rocket..."
    start = src.index("RocketSparseVPluginCreator::parseFields(")
    body = src[start:src.index("\n}\n", start)]
    int_fields = [fields[k] for k in re.findall(r"name == kFIELD_(\w+)\)\s*\{\s*target = &params\.", body)]
    string_branch = re.search(r"if \(([^)]*)\)\s*\{[^{}]*readStringField", body).group(1)
    string_fields = [fields[k] for k in re.findall(r"kFIELD_(\w+)", string_branch)]
    required = re.findall(r'missing \+= " (\w+)";', body)
    return {"fields": fields, "plugin": plugin, "int": int_fields, "string": string_fields, "required": required}


def plugin_node_problems(node: onnx.NodeProto, contract: dict) -> list[str]:
    """Why TensorRT would not create the plugin from ``node`` (empty when it would)."""
    problems = []
    if node.op_type != contract["plugin"]["NAME"]:
        problems.append(f"op type {node.op_type!r} is not the plugin's {contract['plugin']['NAME']!r}")
    attrs = {a.name: a for a in node.attribute}
    for name in contract["required"]:
        if name not in attrs:
            problems.append(f"missing required field {name!r}")
    for name in contract["int"]:
        if name in attrs and attrs[name].type != AttributeProto.INT:
            problems.append(f"{name!r} is {AttributeProto.AttributeType.Name(attrs[name].type)}, not INT")
    lookup = {"plugin_version": contract["plugin"]["VERSION"], "plugin_namespace": contract["plugin"]["NAMESPACE"]}
    for name, want in lookup.items():   # without them the parser looks up version "1" in namespace "" and fails
        a = attrs.get(name)
        if a is None:
            problems.append(f"missing {name!r} (the parser's plugin lookup needs {want!r})")
        elif a.type != AttributeProto.STRING or a.s.decode() != want:
            problems.append(f"{name!r} must be the string {want!r}")
    return problems


@pytest.fixture(scope="module")
def contract():
    return plugin_source_contract()


def test_plugin_source_matches_the_onnx_contract(contract):
    """The plugin's field names and identity are the ones rocket_deploy/onnx_contract.py declares."""
    assert contract["plugin"] == {"NAME": PLUGIN_NAME, "VERSION": PLUGIN_VERSION, "NAMESPACE": PLUGIN_NAMESPACE}
    assert sorted(contract["int"]) == sorted(OP_INT_ATTRIBUTES)
    assert sorted(contract["string"]) == sorted(OP_STRING_ATTRIBUTES)
    assert sorted(contract["fields"].values()) == sorted(OP_INT_ATTRIBUTES + OP_STRING_ATTRIBUTES)
    assert contract["required"] == ["rank", "keep", "out_features"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, weights = rocket_layer_onnx(tmp_path_factory.mktemp("rocket-node") / "layer.onnx")
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return model, nodes[0], weights


def test_exported_node_has_every_field_parse_fields_needs(exported, contract):
    model, node, _ = exported
    assert plugin_node_problems(node, contract) == []
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    d = ROCKET_LAYER
    assert d["rank"] % 8 != 0                                   # the case the old hand-written node got wrong
    assert {k: attrs[k] for k in OP_INT_ATTRIBUTES} == {"rank": d["rank"], "keep": d["keep"],
                                                        "out_features": d["d_out"], "value_type": VALUE_TYPE_SAME}
    assert node.domain == PLUGIN_DOMAINS[0]
    assert helper.make_opsetid(node.domain, OP_OPSET_VERSION) in model.opset_import


def test_exported_node_inputs_have_the_packed_layout(exported):
    model, node, (u, dense_v, _) = exported
    inits = {t.name: t for t in model.graph.initializer}
    assert len(node.input) == 3                                 # value_type 0: no scales input
    values, mask = inits[node.input[1]], inits[node.input[2]]
    d = ROCKET_LAYER
    assert tuple(values.dims) == (d["d_out"], d["keep"])
    assert tuple(mask.dims) == (d["d_out"], -(-d["rank"] // 8)) and mask.data_type == TensorProto.UINT8
    assert u.shape == (d["d_in"], d["rank"]) and dense_v.shape == (d["rank"], d["d_out"])


def test_the_old_hand_built_node_is_rejected(contract):
    """What the TensorRT test used to build (only ``rank``, and r = 8 * mask bytes) is caught by the check."""
    node = helper.make_node(PLUGIN_NAME, ["t", "values", "mask"], ["y"], domain=PLUGIN_DOMAINS[0], rank=64)
    problems = plugin_node_problems(node, contract)
    assert any("'keep'" in p for p in problems) and any("'out_features'" in p for p in problems)
    assert any("'plugin_namespace'" in p for p in problems) and any("'plugin_version'" in p for p in problems)
    bad_type = helper.make_node(PLUGIN_NAME, ["t", "values", "mask"], ["y"], rank=64, keep=8.0, out_features=4,
                                plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)
    assert plugin_node_problems(bad_type, contract) == ["'keep' is FLOAT, not INT"]
