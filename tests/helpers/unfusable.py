"""Copies of an export whose chosen layers no longer pass the fusion rules' checks, and compute the same thing.

What a checkpoint with one odd layer looks like to optimize: the same math written so that a rule's check
refuses it (a rule misses; the graph still computes the model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from dllm_trt.optimize.fusion_census import node_layers


def _before(graph: onnx.GraphProto, reader: onnx.NodeProto, index: int, nodes: list[onnx.NodeProto]) -> None:
    """`nodes` inserted before `reader`, the last one's output taking the place of `reader`'s input `index`."""
    position = list(graph.node).index(reader)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    reader.input[index] = nodes[-1].output[0]


def unfusable_copy(export: Path, out: Path, attention_layer: int, moe_layer: int) -> Path:
    """`export` copied to `out` with one layer's attention scores times a computed 1.0 (the rule wants a constant
    scale) and another layer's routing matrix scattered into computed zeros (the rule wants constant zeros)."""
    shutil.copytree(export, out)
    path = out / "step.onnx"
    layers = {node.name: layer for node, layer in node_layers(ir.load(str(path)).graph).items()}
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}

    def in_layer(layer: int, op_type: str, test=lambda node: True) -> onnx.NodeProto:  # noqa: ANN001
        return next(n for n in graph.node if n.op_type == op_type and layers[n.name] == str(layer) and test(n))

    # attention: Softmax(Add(MatMul(Q, K^T), bias)) -> Softmax(Add(Mul(MatMul(Q, K^T), 1 / 1), bias))
    add = in_layer(attention_layer, "Add", lambda n: any(
        s.op_type == "Softmax" for s in graph.node if n.output[0] in s.input
    ) and producers[n.input[0]].op_type == "MatMul")  # fmt: skip
    one = numpy_helper.from_array(np.array(1.0, np.float32), "odd.one")
    _before(graph, add, 0, [
        helper.make_node("Constant", [], ["odd.c"], value=one, name="odd.constant"),
        helper.make_node("Div", ["odd.c", "odd.c"], ["odd.one"], name="odd.one"),
        helper.make_node("Mul", [add.input[0], "odd.one"], ["odd.scaled"], name="odd.scale"),
    ])  # fmt: skip
    # MoE: ScatterElements(zeros, idx, w) -> ScatterElements(zeros - zeros, idx, w)
    scatter = in_layer(moe_layer, "ScatterElements")
    zeros = scatter.input[0]
    _before(graph, scatter, 0, [helper.make_node("Sub", [zeros, zeros], ["odd.zeros"], name="odd.zeros")])
    onnx.save(model, str(path))
    return out
