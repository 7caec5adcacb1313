"""lint-trt's two judges agree: the pre-flight table and TensorRT for RTX's own parser and builder.

A corpus of optimized directories (the contract graphs, and each with one thing TensorRT may or may
not take) goes through both; the test fails on any graph where one passes and the other does not.
Where the table was wrong, the library was right (its support table version "rtx-1.7" records what
was learned here).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import trt_graphs as graphs
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.engines import lint
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

pytestmark = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


def _first(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _replace(model: onnx.ModelProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> onnx.ModelProto:
    index = list(model.graph.node).index(old)
    del model.graph.node[index]
    for offset, node in enumerate(new):
        model.graph.node.insert(index + offset, node)
    return model


def _in_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.BFLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
    return model


def _softmax_precision():
    model = graphs.step()
    _first(model, "Attention").attribute.append(helper.make_attribute("softmax_precision", 1))
    return model


def _softcap():
    model = graphs.step()
    old = _first(model, "Attention")
    new = helper.make_node("Attention", list(old.input), old.output, name="capped", scale=1.0, softcap=30.0)
    return _replace(model, old, [new])


def _three_d_attention():
    """Q/K/V as [B, T, heads*D] (q_num_heads/kv_num_heads), the output reshaped back to [B, heads, T, D]."""
    model = graphs.step()
    old = _first(model, "Attention")
    producers = {out: node for node in model.graph.node for out in node.output}
    flat = [producers[producers[name].input[0]].input[0] for name in old.input[:1]]  # Transpose <- Reshape <- [B,T,HD]
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, graphs.Q_HEADS, 16], np.int64), "heads4"))
    new = [
        helper.make_node(
            "Attention",
            [flat[0]] * 3,
            ["attention3d"],
            name="attention3d",
            scale=1.0,
            q_num_heads=graphs.Q_HEADS,
            kv_num_heads=graphs.Q_HEADS,
        ),  # fmt: skip
        helper.make_node("Reshape", ["attention3d", "heads4"], ["attention4d"], name="to4d"),
        helper.make_node("Transpose", ["attention4d"], list(old.output), name="heads_first", perm=[0, 2, 1, 3]),
    ]
    return _replace(model, old, new)


def _unknown_custom_op():
    model = graphs.step()
    model.graph.node.append(helper.make_node("FancyOp", ["canvas_ids"], ["fancy"], name="fancy", domain="acme"))
    model.graph.output.append(helper.make_tensor_value_info("fancy", TensorProto.INT64, None))
    return model


def _unsupported_op():
    model = graphs.step()
    old = _first(model, "Neg")
    return _replace(model, old, [helper.make_node("Unique", old.input, old.output, name="bad_op")])


def _int32_matmul():
    model = graphs.step()
    model.graph.node.append(helper.make_node("MatMul", ["ids_a", "ids_b"], ["ids_c"], name="int_matmul"))
    model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.INT32, [2, 2]) for n in ("ids_a", "ids_b")])
    model.graph.output.append(helper.make_tensor_value_info("ids_c", TensorProto.INT32, [2, 2]))
    return model


def _attention_plugin():
    """The head-512 layer's attention as optimize --target trt writes it: the DllmAttention plugin node."""
    model = graphs.step()
    old = [n for n in model.graph.node if n.op_type == "Attention"][-1]  # layer 1: head 512
    new = helper.make_node("DllmAttention", list(old.input), list(old.output), name="long_attention",
                           domain="dllm_trt", scale=1.0, plugin_namespace="dllm_trt", plugin_version="1")  # fmt: skip
    return _replace(model, old, [new])


CORPUS = {
    "contract": (lambda: graphs.step(), {}, True),
    "attention plugin": (_attention_plugin, {}, True),
    "fp32 attention": (lambda: _in_fp32(graphs.step()), {"precision": "fp32"}, True),
    "opset 25": (lambda: graphs.step(opset=25), {}, True),
    "3-D Q/K/V attention": (_three_d_attention, {}, True),
    "softmax_precision": (_softmax_precision, {}, False),
    "softcap": (_softcap, {}, False),
    "unknown custom op": (_unknown_custom_op, {}, False),
    "unsupported op": (_unsupported_op, {}, False),
    "int32 MatMul": (_int32_matmul, {}, False),
}


@pytest.mark.parametrize("case", CORPUS)
def test_the_table_and_the_real_parser_agree(case, tmp_path):
    make, overrides, should_pass = CORPUS[case]
    optimized = graphs.write_optimized(tmp_path / "opt", step_model=make(), **overrides)
    table = lint.run(lint.LintOptions(optimized, table_only=True))
    real = lint.run(lint.LintOptions(optimized))
    assert real.judged_by.startswith("tensorrt-rtx") and "builder" in real.judged_by
    print(f"{case}: table {table.passed}, {real.judged_by}: {real.passed}; " +
          "; ".join(f.line()[:120] for f in real.errors[:1]))  # fmt: skip
    assert table.passed == real.passed == should_pass, (table.table(), real.table())
