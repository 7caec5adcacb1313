"""resolve_reshape_wildcards: the head count written into view(*input_shape, -1, head_dim), equal numbers,
and TensorRT for RTX's parser given static heads where it refused the exported step graph."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.pipeline import clean_up
from dllm_trt.optimize.static_reshape import resolve_reshape_wildcards
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

CTX = PassContext("trt", "fp32", "step", {})


def _model() -> onnx.ModelProto:
    """x [B, T, 64] -> view(B, T, -1, 16) with B and T read off another input's shape, as the exporter writes it;
    a second Reshape with a -1 whose output size is unknown must stay."""
    const = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["mask"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["mask"], ["t"], start=1, end=2),
        helper.make_node("Concat", ["b", "t", "minus_one", "sixteen"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["heads"]),
        helper.make_node("Concat", ["b", "minus_one"], ["flat_target"], axis=0),
        helper.make_node("Reshape", ["x", "flat_target"], ["flat"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 64]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "tokens"])],
        [helper.make_tensor_value_info("heads", TensorProto.FLOAT, ["batch", "tokens", 4, 16]),
         helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["batch", None])],
        [const("minus_one", [-1]), const("sixteen", [16])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_the_head_count_replaces_the_wildcard_and_the_numbers_stay():
    original = _model()
    model = ir.from_proto(original)
    assert resolve_reshape_wildcards(model, CTX) == 1  # the flat Reshape's output size is unknown: kept
    clean_up(model)  # as the stage does after every pass
    proto = ir.to_proto(model)
    assert Counter(n.op_type for n in proto.graph.node) == Counter(n.op_type for n in original.graph.node)
    reshape = next(n for n in proto.graph.node if n.output == ["heads"])
    target = next(n for n in proto.graph.node if n.output[0] == reshape.input[1])
    inits = {i.name: numpy_helper.to_array(i).tolist() for i in proto.graph.initializer}
    assert [inits.get(name) for name in target.input[2:]] == [[4], [16]]
    assert next(n for n in proto.graph.node if n.output == ["flat_target"]).input[1] == "minus_one"
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 64), dtype=np.float32),
             "mask": np.ones((2, 5), dtype=bool)}  # fmt: skip
    want = ort.InferenceSession(original.SerializeToString()).run(None, feeds)
    got = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")
def test_without_the_pass_tensorrt_refuses_the_step_graphs_attention(tiny_export, tmp_path):
    """The reason the pass exists, asked of the real parser: the fused graph without it is refused."""
    from dllm_trt import optimize
    from dllm_trt.optimize.pipeline import PIPELINE
    from dllm_trt.trt import engine
    from dllm_trt.trt.moe_plugin import register_moe_plugin
    from dllm_trt.trt.trt_library import load_library

    lib = load_library(TENSORRT_RTX)
    register_moe_plugin(lib.trt, arch=121)
    passes = tuple(p for p in PIPELINE if p.name != "resolve_reshape_wildcards")
    # the graphs' shapes are what this test checks
    options = optimize.OptimizeOptions(tiny_export, tmp_path / "without", "trt", "bf16", parity="none", quiet=True,
                                       passes=passes)  # fmt: skip
    optimize.run(options)
    with pytest.raises(engine.ParseError, match="number of heads"):
        engine.parse_network(lib, tmp_path / "without" / "step.onnx")
    # the graphs' shapes are what this test checks
    optimize.run(optimize.OptimizeOptions(tiny_export, tmp_path / "with", "trt", "bf16", parity="none", quiet=True))
    network = engine.parse_network(lib, tmp_path / "with" / "step.onnx")[1]
    assert network.num_layers > 0
    manifest = json.loads((tmp_path / "with" / "manifest.json").read_text())
    assert {p["name"]: p["matched"] for p in manifest["passes"]}["resolve_reshape_wildcards"]["step"] > 0
    shutil.rmtree(tmp_path / "without")
