"""upcast_export: a bf16 export (what a bf16 checkpoint, the released one included, exports as) is seen in fp32,
so that every fusion matches it as it matches an fp32 export, and the result is the same graph."""

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dllm_trt import optimize
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.pipeline import clean_up
from dllm_trt.optimize.upcast import upcast_export

CTX = PassContext("trt", "bf16", "step", {})


def _bf16(array: np.ndarray, name: str) -> onnx.TensorProto:
    raw = array.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes()
    return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, vals=raw, raw=True)


def _model() -> onnx.ModelProto:
    """bf16 x @ W, upcast to fp32 for a softmax (as the router does), cast back to bf16."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["h32"], ["p32"], axis=-1),
        helper.make_node("Cast", ["p32"], ["p"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3, 8])],
        [helper.make_tensor_value_info("p", TensorProto.BFLOAT16, [3, 4])],
        [_bf16(rng.standard_normal((8, 4)).astype(np.float32), "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_the_casts_go_the_weights_become_fp32_and_the_values_are_the_bf16_weights_own():
    model = ir.from_proto(_model())
    assert upcast_export(model, CTX) == 1
    clean_up(model)
    proto = ir.to_proto(model)
    assert Counter(n.op_type for n in proto.graph.node) == {"MatMul": 1, "Softmax": 1, "Cast": 1}  # p keeps its name
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    (w,) = proto.graph.initializer
    assert w.name == "w" and w.data_type == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    (got,) = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    weights = numpy_helper.to_array(_model().graph.initializer[0]).astype(np.float32)  # the bf16 values, exactly
    logits = x @ weights
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, expected / expected.sum(-1, keepdims=True), rtol=1e-6)


def test_an_fp32_export_is_left_alone(tiny_export):
    model = ir.load(tiny_export / "step.onnx")
    before = Counter(n.op_type for n in model.graph)
    assert upcast_export(model, CTX) == 0
    assert Counter(n.op_type for n in model.graph) == before


def test_a_tiny_export_bf16_fuses_as_an_fp32_one_and_gives_the_same_graph(tiny_export_bf16, tiny_export, tmp_path):
    graphs = {}
    for name, source in (("bf16", tiny_export_bf16), ("fp32", tiny_export)):
        # the graphs are compared below
        options = optimize.OptimizeOptions(source, tmp_path / name, "trt", "bf16", parity="none", quiet=True)
        manifest = optimize.run(options).manifest
        matched = {p["name"]: p["matched"].get("step", 0) for p in manifest["passes"]}
        layers = len(manifest["model"]["layers"])
        assert matched["fuse_rotary_embedding"] == 2 * layers and matched["fuse_moe"] == layers, (name, matched)
        graphs[name] = onnx.load(str(tmp_path / name / "step.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graphs["bf16"].node] == [n.op_type for n in graphs["fp32"].node]
    # every weight under the same name, dtype and shape (scalar constants are named by the exporter)
    weights = {g: {i.name: (i.data_type, list(i.dims)) for i in graphs[g].initializer if len(i.dims) >= 1}
               for g in graphs}  # fmt: skip
    assert weights["bf16"] == weights["fp32"]


def test_a_tiny_export_bf16_optimized_for_cpu_passes_validate(tiny_export_bf16, tiny_ckpt, tmp_path):
    from dllm_trt import validate

    # the graphs are compared below
    options = optimize.OptimizeOptions(tiny_export_bf16, tmp_path / "opt", "ort-cpu", "bf16", parity="none", quiet=True)
    optimize.run(options)
    result = validate.run(validate.ValidateOptions(tmp_path / "opt", tiny_ckpt, seeds=(0,), quiet=True))
    assert result.passed, result.failures
