"""The graph rewrites `build` applies to an optimized graph just before TensorRT parses it.

An ordered list of passes on the ONNX proto (weights stay external and untouched), each returning
how many nodes it changed:

1. lower_moe: every DllmMoE node becomes the chain of single-kernel plugins + ReduceSum + Cast of
   engines.moe_chain_plugin (why: that module's docstring).
2. decompose_wide_attention: Attention nodes whose head size lies outside the fused-kernel range the
   TensorRT docs give (16..256, multiple of 8) get TRT_decomposable=1, so TensorRT may run them as
   BMM + softmax + BMM instead of failing to build. A node that already says TRT_decomposable=0 is
   left alone (lint-trt reports it as an error).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from dllm_trt.engines import moe_chain_plugin as chain
from dllm_trt.engines.lint import GraphInfo
from dllm_trt.engines.moe_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE
from dllm_trt.engines.plugins import PLUGIN_VERSION
from dllm_trt.engines.support import Support

_AXES = "dllm_trt/moe_reduce_axes"


def _plugin_node(op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(
        op_type, inputs, outputs, name=name, domain=PLUGIN_NAMESPACE,
        plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, **attrs,
    )  # fmt: skip


def lower_moe(model: onnx.ModelProto) -> int:
    """Replace each DllmMoE node, in place, by Route -> Bucket -> ExpertUp -> ExpertDown -> ReduceSum -> Cast."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, count = [], 0
    for index, node in enumerate(graph.node):
        if node.op_type != PLUGIN_NAME or node.domain in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        hidden, logits, scale, gate_up, down = node.input
        if gate_up not in inits:
            raise ValueError(f"DllmMoE node '{node.name}': gate_up_proj '{gate_up}' is not an initializer")
        top_k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "top_k")
        n_experts, dtype = inits[gate_up].dims[0], inits[gate_up].data_type
        stem, out = node.name or f"DllmMoE_{index}", node.output[0]
        t = {k: f"{stem}/{k}" for k in ("topk_ids", "topk_w", "sorted", "counts", "act", "part", "sum")}
        new_nodes += [
            _plugin_node(chain.ROUTE, [logits, scale], [t["topk_ids"], t["topk_w"]], f"{stem}/route", top_k=top_k),
            _plugin_node(
                chain.BUCKET, [t["topk_ids"]], [t["sorted"], t["counts"]], f"{stem}/bucket", num_experts=int(n_experts)
            ),  # fmt: skip
            _plugin_node(
                chain.EXPERT_UP, [hidden, gate_up, t["sorted"], t["counts"]], [t["act"]], f"{stem}/up", top_k=top_k
            ),  # fmt: skip
            _plugin_node(
                chain.EXPERT_DOWN, [t["act"], down, t["sorted"], t["counts"], t["topk_w"]], [t["part"]], f"{stem}/down"
            ),  # fmt: skip
            helper.make_node("ReduceSum", [t["part"], _AXES], [t["sum"]], name=f"{stem}/combine", keepdims=0),
            helper.make_node("Cast", [t["sum"]], [out], name=f"{stem}/cast", to=dtype),
        ]
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        if _AXES not in inits:
            graph.initializer.append(helper.make_tensor(_AXES, TensorProto.INT64, [1], [1]))
    return count


def decompose_wide_attention(model: onnx.ModelProto, support: Support) -> int:
    """TRT_decomposable=1 on Attention nodes whose head size has no fused kernel (and that do not forbid it)."""
    info = GraphInfo(model)
    limits = support.fused_attention
    count = 0
    for node in model.graph.node:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        if any(a.name == "TRT_decomposable" for a in node.attribute):
            continue
        head = info.last_dim(node.input[0]) or info.last_dim(node.input[1])
        fused = head is not None and limits["head_size_min"] <= head <= limits["head_size_max"]
        fused = fused and head % limits["head_size_multiple_of"] == 0
        if head is not None and not fused:
            node.attribute.append(helper.make_attribute("TRT_decomposable", 1))
            count += 1
    return count


def prepare_for_parser(model: onnx.ModelProto, support: Support) -> dict[str, int]:
    """Apply the passes in order (in place); returns {pass: nodes changed}."""
    counts = {"lower_moe": lower_moe(model)}
    counts["decompose_wide_attention"] = decompose_wide_attention(model, support)
    if counts["lower_moe"] and not any(o.domain == PLUGIN_NAMESPACE for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_NAMESPACE, 1))
    return counts
