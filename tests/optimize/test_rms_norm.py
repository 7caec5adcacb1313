"""fuse_rms_norm: the count, RMSNormalization in and Pow/ReduceMean out, equal numbers, no false matches."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.rms_norm import fuse_rms_norm

CTX = PassContext("ort-cpu", "fp32", "step", {})
HIDDEN = 16


def _const(name: str, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _norm_nodes(x: str, out: str, prefix: str, exponent=2.0, minus_half=-0.5, axes=(-1,)) -> tuple[list, list]:
    """transformers' RMSNorm._norm as the exporter writes it: x * Pow(ReduceMean(Pow(x, 2)) + eps, -0.5)."""
    inits = [_const(f"{prefix}.two", exponent), _const(f"{prefix}.axes", list(axes), np.int64),
             _const(f"{prefix}.eps", 1e-6), _const(f"{prefix}.minus_half", minus_half)]  # fmt: skip
    nodes = [
        helper.make_node("Pow", [x, f"{prefix}.two"], [f"{prefix}.sq"]),
        helper.make_node("ReduceMean", [f"{prefix}.sq", f"{prefix}.axes"], [f"{prefix}.mean"], keepdims=1),
        helper.make_node("Add", [f"{prefix}.mean", f"{prefix}.eps"], [f"{prefix}.plus_eps"]),
        helper.make_node("Pow", [f"{prefix}.plus_eps", f"{prefix}.minus_half"], [f"{prefix}.rrms"]),
        helper.make_node("Mul", [x, f"{prefix}.rrms"], [out]),
    ]
    return nodes, inits


def _model(nodes, inits, outputs: list[str], dtype=TensorProto.FLOAT) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, [2, 5, HIDDEN])],
        [helper.make_tensor_value_info(name, dtype, None) for name in outputs], inits,
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # test our rewrite only
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


def _fuse_and_compare(model: ir.Model, dtype=np.float32, rtol=1e-5, atol=1e-6) -> int:
    x = np.random.default_rng(0).standard_normal((2, 5, HIDDEN)).astype(dtype) * 3
    expected = _run(model, x)
    count = fuse_rms_norm(model, CTX)
    for actual, wanted in zip(_run(model, x), expected):
        np.testing.assert_allclose(actual.astype(np.float32), wanted.astype(np.float32), rtol=rtol, atol=atol)
    return count


def _weight(name: str, seed: int) -> TensorProto:
    return _const(name, np.random.default_rng(seed).standard_normal(HIDDEN))


def test_weighted_norm_fuses():
    nodes, inits = _norm_nodes("x", "n", "norm")
    model = _model([*nodes, helper.make_node("Mul", ["n", "w"], ["y"])], [*inits, _weight("w", 1)], ["y"])
    assert _fuse_and_compare(model) == 1
    ops = _ops(model)
    assert ops["RMSNormalization"] == 1 and ops["Pow"] == ops["ReduceMean"] == ops["Mul"] == 0
    node = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert node.inputs[1].name == "w"
    assert node.attributes["axis"].value == -1 and node.attributes["stash_type"].value == 1
    assert node.attributes["epsilon"].value == pytest.approx(1e-6)


def test_weightless_norm_gets_a_ones_scale():
    nodes, inits = _norm_nodes("x", "y", "norm")
    model = _model(nodes, inits, ["y"])
    assert _fuse_and_compare(model) == 1
    node = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert np.array_equal(node.inputs[1].const_value.numpy(), np.ones(HIDDEN, np.float32))


def test_commuted_operands_fuse():
    nodes, inits = _norm_nodes("x", "n", "norm")
    nodes[2] = helper.make_node("Add", ["norm.eps", "norm.mean"], ["norm.plus_eps"])
    nodes[4] = helper.make_node("Mul", ["norm.rrms", "x"], ["n"])
    model = _model([*nodes, helper.make_node("Mul", ["w", "n"], ["y"])], [*inits, _weight("w", 1)], ["y"])
    assert _fuse_and_compare(model) == 1
    assert _ops(model)["Pow"] == 0


def test_shared_normalized_value_gets_one_norm_per_consumer():
    # As the exporter's CSE leaves it: one normalized value feeds the router (* scale * H^-0.5), the expert
    # branch's pre_feedforward_layernorm_2 (* weight), and a weightless use (v_norm beside k_norm).
    nodes, inits = _norm_nodes("x", "n", "norm")
    nodes += [
        helper.make_node("Mul", ["n", "router.scale"], ["scaled"]),
        helper.make_node("Mul", ["scaled", "root_size"], ["router_in"]),
        helper.make_node("Mul", ["n", "pre_ff2.weight"], ["experts_in"]),
        helper.make_node("Transpose", ["n"], ["value"], perm=[1, 0, 2]),
    ]
    inits += [_weight("router.scale", 1), _weight("pre_ff2.weight", 2), _const("root_size", HIDDEN**-0.5)]
    model = _model(nodes, inits, ["router_in", "experts_in", "value"])
    assert _fuse_and_compare(model) == 3
    ops = _ops(model)
    assert ops["RMSNormalization"] == 3 and ops["Pow"] == ops["ReduceMean"] == 0
    assert ops["Mul"] == 1  # only the router's H^-0.5 remains
    scales = {n.inputs[1].name for n in model.graph if n.op_type == "RMSNormalization"}
    assert scales == {"pre_ff2.weight", "router.scale", f"rms_norm.ones_{HIDDEN}.float"}


@pytest.mark.parametrize("weighted", [True, False])
def test_float16_norm_with_casts_fuses_into_one_float16_node(weighted):
    # transformers' RMSNorm in a float16 model: hidden.float() ... (* weight.float()) ... .type_as(hidden)
    nodes, inits = _norm_nodes("xf", "n", "norm")
    nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    if weighted:
        weight = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float16).astype(np.float32)
        nodes.append(helper.make_node("Mul", ["n", "w"], ["nw"]))
        inits.append(_const("w", weight))
    nodes.append(helper.make_node("Cast", ["nw" if weighted else "n"], ["y"], to=TensorProto.FLOAT16))
    model = _model(nodes, inits, ["y"], TensorProto.FLOAT16)
    # The fused node rounds the normalized value to float16 before the scale: one extra float16 rounding step.
    assert _fuse_and_compare(model, np.float16, rtol=2e-3, atol=2e-3) == 1
    ops = _ops(model)
    assert ops["RMSNormalization"] == 1 and ops["Cast"] == ops["Pow"] == 0
    node = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert node.inputs[0].name == "x" and node.inputs[1].dtype == ir.DataType.FLOAT16


def test_bfloat16_norm_keeps_bfloat16_io():
    # onnxruntime has no bfloat16 RMSNormalization on CPU: structure only.
    nodes, inits = _norm_nodes("xf", "n", "norm")
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        *nodes,
        helper.make_node("Mul", ["n", "w"], ["nw"]),
        helper.make_node("Cast", ["nw"], ["y"], to=TensorProto.BFLOAT16),
    ]
    model = _model(nodes, [*inits, _const("w", [0.5] * HIDDEN)], ["y"], TensorProto.BFLOAT16)
    assert fuse_rms_norm(model, CTX) == 1
    node = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert node.inputs[0].name == "x" and node.inputs[1].dtype == ir.DataType.BFLOAT16
    assert node.inputs[1].const_value.numpy().astype(np.float32).tolist() == [0.5] * HIDDEN
    assert _ops(model)["Cast"] == 0


@pytest.mark.parametrize(
    "variant", [dict(exponent=3.0), dict(minus_half=-1.0), dict(axes=(1,)), dict(axes=(1, 2))], ids=str
)
def test_near_misses_do_not_fuse(variant):
    nodes, inits = _norm_nodes("x", "n", "norm", **variant)
    model = _model([*nodes, helper.make_node("Mul", ["n", "w"], ["y"])], [*inits, _weight("w", 1)], ["y"])
    before = _ops(model)
    assert _fuse_and_compare(model) == 0
    assert _ops(model) == before


def test_every_norm_of_the_exported_graphs_fuses_and_parity_holds(tiny_export, tmp_path, assert_step_parity):
    out = tmp_path / "onnx"
    shutil.copytree(tiny_export, out)
    facts = json.loads((out / "manifest.json").read_text())["model"]
    layers = facts["num_layers"]
    # Per full layer: input, q, k, v, post-attention, pre-FFN, post-FFN-1, router, pre-FFN-2, post-FFN-2,
    # post-FFN norms; the step adds the self-conditioning pre/post norms and the final norm.
    expected = {"step": 2 + 11 * layers + 1}
    for name, count in expected.items():
        model = ir.load(tiny_export / f"{name}.onnx")  # the copy is overwritten below: read the original
        assert fuse_rms_norm(model, PassContext("ort-cpu", "fp32", name, facts)) == count
        ops = _ops(model)
        assert ops["RMSNormalization"] == count and ops["Pow"] == ops["ReduceMean"] == 0
        ir.save(model, out / f"{name}.onnx", external_data=f"{name}.onnx.data")

    assert_step_parity(out)
