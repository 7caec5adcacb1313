"""softmax_in_requested_dtype: Cast(Softmax(x bf16), float) -> Softmax(Cast(x, float)), PyTorch's order."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from dllm_trt.export.softmax_precision import softmax_in_requested_dtype


def _pattern(dtype: ir.DataType) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([4, 128]))
    softmax = ir.node("Softmax", [x], attributes={"axis": -1})
    softmax.outputs[0].type = ir.TensorType(dtype)
    cast = ir.node("Cast", [softmax.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    top = ir.node("TopK", [cast.outputs[0], ir.Value(name="k")], num_outputs=2)
    k = ir.Value(name="k", const_value=ir.tensor(np.array([8], dtype=np.int64)))
    top.replace_input_with(1, k)
    for out, t in zip(top.outputs, (ir.DataType.FLOAT, ir.DataType.INT64)):
        out.type = ir.TensorType(t)
    top.outputs[0].name, top.outputs[1].name = "values", "indices"
    graph = ir.Graph([x], list(top.outputs), nodes=[softmax, cast, top], initializers=[k], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_softmax_of_bf16_runs_in_fp32_as_pytorch_computes_it():
    model = _pattern(ir.DataType.BFLOAT16)
    assert softmax_in_requested_dtype(model.graph) == 1
    ops = [node.op_type for node in model.graph]
    assert ops == ["Cast", "Softmax", "TopK"] and model.graph.node(1).inputs[0].dtype == ir.DataType.FLOAT
    # near-uniform logits, as a random 128-expert router's are: rounding the probabilities to bf16 ties them
    logits = (torch.randn(4, 128, generator=torch.Generator().manual_seed(0)) * 0.01).to(torch.bfloat16)
    session = ort.InferenceSession(
        ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    bits = logits.view(torch.uint16).numpy()
    feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx.TensorProto.BFLOAT16)
    values, indices = session.run(None, {"x": feed})
    expected = torch.softmax(logits, dim=-1, dtype=torch.float32).topk(8)
    np.testing.assert_allclose(values, expected.values.numpy(), rtol=1e-6, atol=0)
    assert (indices == expected.indices.numpy()).all()
    # what the exporter's order computes instead: probabilities rounded to bf16, the top-8 tied and reordered
    rounded = torch.softmax(logits.float(), dim=-1).to(torch.bfloat16).float().topk(8)
    assert not torch.equal(rounded.indices, expected.indices)


def test_a_softmax_already_in_fp32_or_read_elsewhere_is_left_alone():
    model = _pattern(ir.DataType.FLOAT)
    assert softmax_in_requested_dtype(model.graph) == 0
    assert [node.op_type for node in model.graph] == ["Softmax", "Cast", "TopK"]
