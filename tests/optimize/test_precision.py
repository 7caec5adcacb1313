"""convert_precision: dtypes per region, fp32 islands kept, masks finite, numerics close."""

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.generation.cpu_variant import emulate_bfloat16
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.precision import convert_precision

N, H, E = 6, 16, 4


def block() -> onnx.ModelProto:
    """x -> MatMul(W) -> RMSNormalization -> router MatMul -> Softmax -> TopK; and a masked softmax."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((H, H)).astype(np.float32) / 4, "w"),
        numpy_helper.from_array(1 + 0.1 * rng.standard_normal(H).astype(np.float32), "norm_w"),
        numpy_helper.from_array(rng.standard_normal((H, E)).astype(np.float32) / 4, "router"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "k"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), "min"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "k1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("RMSNormalization", ["h", "norm_w"], ["n"], axis=-1, epsilon=1e-6, stash_type=1),
        helper.make_node("MatMul", ["n", "router"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("TopK", ["probs", "k1"], ["top", "idx"]),
        helper.make_node("Where", ["mask", "zero", "min"], ["bias"]),
        helper.make_node("MatMul", ["n", "w"], ["scores_raw"]),
        helper.make_node("Add", ["scores_raw", "bias"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, H]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [N, H])],
        [helper.make_tensor_value_info("top", TensorProto.FLOAT, [N, 2]),
         helper.make_tensor_value_info("attn", TensorProto.FLOAT, [N, H]),
         helper.make_tensor_value_info("n", TensorProto.FLOAT, [N, H])],
        initializer=inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)


def convert(precision: str) -> ir.Model:
    model = ir.from_proto(block())
    ctx = PassContext("trt", precision, "step", {"num_experts": E, "top_k_experts": 2, "vocab_size": 1000})
    assert convert_precision(model, ctx) > 0
    return model


def feeds(dtype=np.float32) -> dict:
    x = np.random.default_rng(1).standard_normal((N, H)).astype(dtype)
    mask = np.ones((N, H), dtype=bool)
    mask[0] = False  # a fully masked row, as a left-padding query
    return {"x": x, "mask": mask}


def test_fp16_regions_and_numerics():
    model = convert("fp16")
    values = {v.name: v for node in model.graph for v in node.outputs}
    assert model.graph.initializers["w"].dtype == ir.DataType.FLOAT  # the original is replaced by a copy
    assert values["n"].dtype == ir.DataType.FLOAT16  # norm output in the low precision
    assert values["probs"].dtype == ir.DataType.FLOAT  # router softmax stays fp32
    assert values["top"].dtype == ir.DataType.FLOAT
    proto = ir.to_proto(model)
    assert any(i.data_type == TensorProto.FLOAT16 and i.dims == [H, H] for i in proto.graph.initializer)
    expected = run(block(), feeds())
    x = feeds()
    x["x"] = x["x"].astype(np.float16)
    actual = run(proto, x)
    for name, a, e in zip(("top", "attn", "n"), actual, expected):
        a = a.astype(np.float32)
        assert np.isfinite(a).all(), name  # the fully masked row stays finite
        # Row 0 is fully masked (padding): its scores sit at fp16's floor, where 1 ulp is 32, so its
        # (unused) softmax is not uniform as in fp32; every other row must match.
        error = np.abs(a[1:] - e[1:]).max() / np.abs(e[1:]).max()
        print(f"fp16 {name}: max rel {error:.2e} (rows with a valid key)")
        assert error < 2e-2, name


def test_bf16_through_the_emulation():
    model = convert("bf16")
    assert any(i.dtype == ir.DataType.BFLOAT16 for i in model.graph.initializers.values())
    emulate_bfloat16(model)
    proto = ir.to_proto(model)
    assert not any(i.data_type == TensorProto.BFLOAT16 for i in proto.graph.initializer)
    expected = run(block(), feeds())
    actual = run(proto, feeds())
    for name, a, e in zip(("top", "attn", "n"), actual, expected):
        error = np.abs(a - e).max() / np.abs(e).max()
        print(f"bf16 (emulated) {name}: max rel {error:.2e}")
        assert np.isfinite(a).all(), name
        assert 0 < error < 5e-2, name  # rounded as bf16, not silently fp32
    # the mask constant was clamped into bf16's finite range before any cast
    assert float(ml_dtypes.finfo(ml_dtypes.bfloat16).min) >= float(np.finfo(np.float32).min)


def test_fp32_is_left_alone():
    model = ir.from_proto(block())
    ctx = PassContext("trt", "fp32", "step", {"num_experts": E, "top_k_experts": 2, "vocab_size": 1000})
    assert convert_precision(model, ctx) == 0


def test_the_tied_lm_head_reads_the_one_low_precision_embedding_and_its_logits_are_fp32():
    """Gather(E) for the embedding and MatMul(h, Transpose(E)) for the LM head, as the exporter writes a tied
    head: one bf16 copy of E (no fp32 one left behind for the Transpose), the logits upcast before the softcap."""
    v, h = 32, 8
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Et"], ["raw"]),
        helper.make_node("Div", ["raw", "cap"], ["d"]),
        helper.make_node("Tanh", ["d"], ["t"]),
        helper.make_node("Mul", ["t", "cap"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [N])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [N, v])],
        initializer=[numpy_helper.from_array(rng.standard_normal((v, h)).astype(np.float32), "E"),
                     numpy_helper.from_array(np.array(30.0, dtype=np.float32), "cap")],
    )  # fmt: skip
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model = ir.from_proto(original)
    ctx = PassContext("trt", "bf16", "step", {"num_experts": E, "top_k_experts": 2, "vocab_size": v})
    convert_precision(model, ctx)
    from dllm_trt.optimize.pipeline import clean_up

    clean_up(model)
    proto = ir.to_proto(model)
    tables = [i for i in proto.graph.initializer if list(i.dims) == [v, h]]
    assert [(t.name, t.data_type) for t in tables] == [("E.bfloat16", TensorProto.BFLOAT16)]
    after_matmul = next(n for n in proto.graph.node if n.input and n.input[0] == "raw")
    assert after_matmul.op_type == "Cast" and after_matmul.attribute[0].i == TensorProto.FLOAT
    ids = rng.integers(0, v, N).astype(np.int64)
    (want,) = run(original, {"ids": ids})
    emulated = ir.from_proto(proto)
    emulate_bfloat16(emulated)
    (got,) = run(ir.to_proto(emulated), {"ids": ids})
    error = np.abs(got - want).max()
    print(f"logits max abs error in bf16: {error:.3e}")
    assert error < 0.5  # bf16 weights: about 3 significant digits of logits up to 30


def test_large_weights_are_converted_when_saved_to_the_same_bytes(monkeypatch):
    from dllm_trt.optimize import precision

    eager = ir.to_proto(convert("bf16"))
    monkeypatch.setattr(precision, "LAZY_ELEMENTS", 0)  # every constant lazy, as a released-size weight is
    lazy_model = convert("bf16")
    converted = [v for v in lazy_model.graph.initializers.values() if v.name.endswith(".bfloat16")]
    assert converted and all(isinstance(v.const_value, ir.LazyTensor) for v in converted)
    lazy = ir.to_proto(lazy_model)
    tables = lambda m: {i.name: numpy_helper.to_array(i).tobytes() for i in m.graph.initializer}  # noqa: E731
    assert tables(lazy) == tables(eager)
