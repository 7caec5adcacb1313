"""add_sampling_head: built graph -> the sampler's outputs inside the graph, equal to the torch head."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.sampling_head import add_sampling_head
from dllm_trt.runtime.sampler import sampling_head, sampling_noise

B, C, V, H = 2, 5, 37, 8
CTX = PassContext("ort-cpu", "fp32", "denoiser", {"num_experts": 4, "top_k_experts": 2, "vocab_size": V})


def denoiser_like(output_name: str = "logits") -> onnx.ModelProto:
    """canvas_ids -> Gather(E) * scale -> MatMul(W) -> Tanh*30 (softcap) -> logits [B, C, V]."""
    rng = np.random.default_rng(0)
    embed = numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "embed")
    scale = numpy_helper.from_array(np.array(np.sqrt(H), dtype=np.float32), "embed_scale")
    head = numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "head")
    cap = numpy_helper.from_array(np.array(30.0, dtype=np.float32), "cap")
    nodes = [
        helper.make_node("Gather", ["embed", "canvas_ids"], ["e"]),
        helper.make_node("Mul", ["e", "embed_scale"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["raw"]),
        helper.make_node("Div", ["raw", "cap"], ["d"]),
        helper.make_node("Tanh", ["d"], ["t"]),
        helper.make_node("Mul", ["t", "cap"], [output_name]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("canvas_ids", TensorProto.INT64, ["batch", C])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", C, V])],
        initializer=[embed, scale, head, cap],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options)


def test_head_equals_the_torch_sampler_head():
    original = denoiser_like()
    model = ir.from_proto(original)
    assert add_sampling_head(model, CTX) == 1
    rewritten = ir.to_proto(model)
    outputs = [o.name for o in rewritten.graph.output]
    assert outputs == ["sampled_ids", "argmax_ids", "entropy", "next_self_conditioning"]
    assert {"temperature", "sampling_noise"} <= {i.name for i in rewritten.graph.input}
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("ArgMax") == 2 and "LogSoftmax" in ops

    canvas = np.random.default_rng(1).integers(0, V, (B, C)).astype(np.int64)
    (logits,) = session(original).run(None, {"canvas_ids": canvas})
    generator = torch.Generator().manual_seed(3)
    noise = sampling_noise(B, C, V, generator)
    temperature = torch.tensor(0.55)
    processed = torch.from_numpy(logits) / temperature
    expected = sampling_head(processed, noise)
    embed = torch.from_numpy(numpy_helper.to_array(original.graph.initializer[0]).copy())
    expected_sc = torch.softmax(processed, -1) @ embed * float(np.sqrt(H))
    sampled, argmax, entropy, sc = session(rewritten).run(
        None, {"canvas_ids": canvas, "temperature": temperature.numpy(), "sampling_noise": noise.view(B, C, V).numpy()}
    )
    assert np.array_equal(sampled, expected.sampled.numpy())
    assert np.array_equal(argmax, expected.argmax.numpy())
    entropy_error = np.abs(entropy - expected.entropy.numpy()).max()
    sc_error = np.abs(sc - expected_sc.numpy()).max() / np.abs(expected_sc.numpy()).max()
    print(f"entropy max abs error {entropy_error:.2e}, self-conditioning max rel error {sc_error:.2e}")
    assert entropy_error < 1e-5 and sc_error < 1e-6


def test_graph_without_logits_is_left_alone():
    model = ir.from_proto(denoiser_like(output_name="hidden"))
    before = len(list(model.graph))
    assert add_sampling_head(model, CTX) == 0
    assert len(list(model.graph)) == before
