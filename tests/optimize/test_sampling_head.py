"""add_sampling_head: built graph -> the sampler's outputs inside the graph, equal to the torch head."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.generation.sampler import sampling_head, sampling_noise
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.sampling_head import add_sampling_head

B, C, V, H = 2, 5, 37, 8
CTX_REST = ("fp32", "step", {"num_experts": 4, "top_k_experts": 2, "vocab_size": V})
CTX = PassContext("ort-cpu", *CTX_REST)


def step_like(output_name: str = "logits", all_tied: bool = False) -> onnx.ModelProto:
    """input_ids -> Gather(E) * scale -> MatMul(W) -> Tanh*30 (softcap) -> logits [B, C, V].

    `all_tied`: every column of W the same, so every logit of a row ties."""
    rng = np.random.default_rng(0)
    embed = numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "embed")
    scale = numpy_helper.from_array(np.array(np.sqrt(H), dtype=np.float32), "embed_scale")
    weights = rng.standard_normal((H, 1 if all_tied else V)).astype(np.float32)
    head = numpy_helper.from_array(np.ascontiguousarray(np.broadcast_to(weights, (H, V))), "head")
    cap = numpy_helper.from_array(np.array(30.0, dtype=np.float32), "cap")
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["e"]),
        helper.make_node("Mul", ["e", "embed_scale"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["raw"]),
        helper.make_node("Div", ["raw", "cap"], ["d"]),
        helper.make_node("Tanh", ["d"], ["t"]),
        helper.make_node("Mul", ["t", "cap"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", C])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", C, V])],
        initializer=[embed, scale, head, cap],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options)


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_head_equals_the_torch_sampler_head(target: str):
    original = step_like()
    model = ir.from_proto(original)
    assert add_sampling_head(model, PassContext(target, *CTX_REST)) == 1
    rewritten = ir.to_proto(model)
    outputs = [o.name for o in rewritten.graph.output]
    assert outputs == ["sampled_ids", "argmax_ids", "entropy", "next_self_conditioning"]
    assert {"temperature", "sampling_noise"} <= {i.name for i in rewritten.graph.input}
    ops = [n.op_type for n in rewritten.graph.node]
    argmax_op = "TopK" if target == "ort-cpu" else "ArgMax"
    other = "ArgMax" if target == "ort-cpu" else "TopK"
    assert ops.count(argmax_op) == 2 and other not in ops and "LogSoftmax" in ops

    canvas = np.random.default_rng(1).integers(0, V, (B, C)).astype(np.int64)
    (logits,) = session(original).run(None, {"input_ids": canvas})
    generator = torch.Generator().manual_seed(3)
    noise = sampling_noise(B, C, V, generator)
    temperature = torch.linspace(0.45, 0.75, B)  # one per row: rows at different steps share a call
    processed = torch.from_numpy(logits) / temperature[:, None, None]
    expected = sampling_head(processed, noise)
    embed = torch.from_numpy(numpy_helper.to_array(original.graph.initializer[0]).copy())
    expected_sc = torch.softmax(processed, -1) @ embed * float(np.sqrt(H))
    sampled, argmax, entropy, sc = session(rewritten).run(
        None, {"input_ids": canvas, "temperature": temperature.numpy(), "sampling_noise": noise.view(B, C, V).numpy()}
    )
    assert np.array_equal(sampled, expected.sampled.numpy())
    assert np.array_equal(argmax, expected.argmax.numpy())
    entropy_error = np.abs(entropy - expected.entropy.numpy()).max()
    sc_error = np.abs(sc - expected_sc.numpy()).max() / np.abs(expected_sc.numpy()).max()
    print(f"entropy max abs error {entropy_error:.2e}, self-conditioning max rel error {sc_error:.2e}")
    assert entropy_error < 1e-5 and sc_error < 1e-6


@pytest.mark.parametrize("target", ["ort-cpu", "trt"])
def test_ties_take_the_first_index_as_torch_does(target: str):
    """Every logit of a row equal and the noise all ones: torch's argmax takes index 0, so must the graph."""
    model = ir.from_proto(step_like(all_tied=True))
    add_sampling_head(model, PassContext(target, *CTX_REST))
    canvas = np.random.default_rng(2).integers(0, V, (B, C)).astype(np.int64)
    feeds = {"input_ids": canvas, "temperature": np.full(B, 0.7, np.float32),
             "sampling_noise": np.ones((B, C, V), np.float32)}  # fmt: skip
    sampled, argmax, _, _ = session(ir.to_proto(model)).run(None, feeds)
    reference = sampling_head(torch.zeros(B, C, V), torch.ones(B * C, V))
    assert not reference.argmax.any() and not reference.sampled.any()
    assert not argmax.any() and not sampled.any()


def test_graph_without_logits_is_left_alone():
    model = ir.from_proto(step_like(output_name="hidden"))
    before = len(list(model.graph))
    assert add_sampling_head(model, CTX) == 0
    assert len(list(model.graph)) == before
