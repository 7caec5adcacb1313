"""The CPU stand-ins: our reading of com.microsoft.MoE against onnxruntime's own CPU kernel where
that kernel runs, the geglu / DllmMoE layouts against moe_reference, and the retargeting."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

from dllm_trt.generation.cpu_standins import STANDIN_DOMAIN, standin_session_options, with_cpu_standins
from dllm_trt.kernels.moe_triton import moe_reference

N, H, E, K, I = 7, 12, 6, 2, 5  # noqa: E741  tokens, hidden, experts, active experts, expert width
TOL = 1e-5  # max|a-b| / max|b|: fp32 kernels against the float64 stand-in


def _graph(nodes, initializers: dict[str, np.ndarray], domain: str) -> onnx.ModelProto:  # noqa: ANN001
    inputs = [
        oh.make_tensor_value_info("x", TensorProto.FLOAT, [N, H]),
        oh.make_tensor_value_info("logits", TensorProto.FLOAT, [N, E]),
    ]
    outputs = [oh.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [N, H]) for node in nodes]
    tensors = [oh.make_tensor(name, TensorProto.FLOAT, a.shape, a.ravel()) for name, a in initializers.items()]
    graph = oh.make_graph(nodes, "moe", inputs, outputs, tensors)
    opsets = [oh.make_opsetid("", 23), oh.make_opsetid(domain, 1)]
    return oh.make_model(graph, opset_imports=opsets, ir_version=10)


def _moe(fc1: np.ndarray, fc2: np.ndarray, out: str = "y", bias: bool = False, **attrs) -> onnx.ModelProto:  # noqa: ANN003
    inits = {"fc1": fc1, "fc2": fc2}
    if bias:
        inits["fc1_bias"] = np.zeros(fc1.shape[:2], np.float32)
    node = oh.make_node(
        "MoE", ["x", "logits", "fc1", "fc1_bias" if bias else "", "fc2"], [out], domain="com.microsoft", k=K, **attrs
    )
    return _graph([node], inits, "com.microsoft")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], standins: bool) -> np.ndarray:
    options = standin_session_options() if standins else ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((N, H), np.float32), "logits": rng.standard_normal((N, E), np.float32)}


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(
    ("activation", "attrs"),
    [
        ("relu", dict(normalize_routing_weights=0)),
        ("relu", dict(normalize_routing_weights=1)),
        ("gelu", dict(normalize_routing_weights=1)),
        ("silu", {}),
        ("identity", dict(normalize_routing_weights=1)),
        ("swiglu", dict(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=1)),
        ("swiglu", dict(swiglu_fusion=1, activation_alpha=1.702, activation_beta=1.0, swiglu_limit=0.7)),
    ],
)
def test_ort_moe_standin_matches_the_cpu_kernel(activation, attrs):
    """Routing (softmax of logits, top-k, renormalise), fc1 [E, fusion*I, H], fc2 [E, H, I], the
    interleaved gate/up layout: the parts of our reading that onnxruntime's CPU kernel can confirm."""
    rng = np.random.default_rng(1)
    fusion = 2 if activation == "swiglu" else 1
    fc1 = rng.standard_normal((E, fusion * I, H)).astype(np.float32)
    fc2 = rng.standard_normal((E, H, I)).astype(np.float32)
    model = _moe(fc1, fc2, activation_type=activation, **attrs)
    feeds = _inputs()
    kernel = _run(model, feeds, standins=False)
    standin_model = with_cpu_standins(model, all_moe=True)
    assert [n.domain for n in standin_model.graph.node] == [STANDIN_DOMAIN]
    standin = _run(standin_model, feeds, standins=True)
    print(f"{activation} {attrs}: max rel {_rel(standin, kernel):.2e} (tol {TOL})")
    assert _rel(standin, kernel) <= TOL


def _hf_experts(seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gate_up = rng.standard_normal((E, 2 * I, H)).astype(np.float32)  # [E, 2I, H]: gate rows, then up rows
    down = rng.standard_normal((E, H, I)).astype(np.float32)  # [E, H, I]
    scale = rng.uniform(0.5, 1.5, E).astype(np.float32)
    return gate_up, down, scale


def _reference(feeds: dict[str, np.ndarray], gate_up, down, scale) -> np.ndarray:  # noqa: ANN001
    tensors = [torch.from_numpy(a) for a in (feeds["x"], feeds["logits"], scale, gate_up, down)]
    return moe_reference(*tensors, top_k=K).numpy()


@pytest.mark.parametrize("fusion", [1, 2])
def test_geglu_standin_is_diffusion_gemma_moe_with_scale_folded(fusion):
    """What FuseMoE[ort-cuda] emits (fusion 2: HF rows as they are; fusion 1: gate/up interleaved)
    equals moe_reference once per_expert_scale is folded into fc2."""
    gate_up, down, scale = _hf_experts()
    fc1 = gate_up
    if fusion == 1:
        fc1 = np.empty_like(gate_up)
        fc1[:, 0::2], fc1[:, 1::2] = gate_up[:, :I], gate_up[:, I:]
    fc2 = down * scale[:, None, None]
    model = _moe(fc1, fc2, activation_type="geglu", swiglu_fusion=fusion, normalize_routing_weights=1)
    feeds = _inputs(3)
    actual = _run(with_cpu_standins(model), feeds, standins=True)
    expected = _reference(feeds, gate_up, down, scale)
    print(f"geglu fusion {fusion}: max rel {_rel(actual, expected):.2e} (tol {TOL})")
    assert _rel(actual, expected) <= TOL


def test_geglu_standin_reads_each_layout_as_the_spec_says():
    """onnxruntime's MoE schema (1.32): "swiglu_fusion: 1: fused and interleaved, 2: fused and not
    interleaved ([gate | up] for geglu)". Weights in one layout under the other attribute must not
    pass: a rewrite that emitted the wrong swiglu_fusion would fail parity through the stand-in."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    schema = next(s for s in get_all_operator_schema() if s.name == "MoE" and s.domain == "com.microsoft")
    assert "2: fused and not interleaved ([gate | up] for geglu)" in schema.attributes["swiglu_fusion"].description
    gate_up, down, scale = _hf_experts()
    fc2 = down * scale[:, None, None]
    feeds = _inputs(3)
    expected = _reference(feeds, gate_up, down, scale)
    for fusion in (1, 2):  # HF's [gate | up] rows as they are, labelled with each fusion value
        model = _moe(gate_up, fc2, activation_type="geglu", swiglu_fusion=fusion, normalize_routing_weights=1)
        error = _rel(_run(with_cpu_standins(model), feeds, standins=True), expected)
        print(f"[gate | up] weights as swiglu_fusion={fusion}: max rel {error:.2e}")
        assert (error <= TOL) == (fusion == 2), (fusion, error)


def test_dllm_moe_standin_is_moe_reference():
    gate_up, down, scale = _hf_experts()
    node = oh.make_node(
        "DllmMoE", ["x", "logits", "scale", "gate_up", "down"], ["y"], domain="dllm_trt",
        top_k=K, activation="gelu_tanh", plugin_namespace="dllm_trt", plugin_version="1",
    )  # fmt: skip
    model = _graph([node], {"scale": scale, "gate_up": gate_up, "down": down}, "dllm_trt")
    feeds = _inputs(4)
    actual = _run(with_cpu_standins(model), feeds, standins=True)
    np.testing.assert_allclose(actual, _reference(feeds, gate_up, down, scale), rtol=0, atol=0)


def test_retargets_only_what_the_cpu_cannot_run():
    gate_up, down, scale = _hf_experts()
    relu = oh.make_node("MoE", ["x", "logits", "gate", "", "fc2"], ["relu"], domain="com.microsoft", k=K)
    geglu = _moe(gate_up, down, out="geglu", activation_type="geglu", swiglu_fusion=2).graph.node[0]
    dllm = oh.make_node(
        "DllmMoE",
        ["x", "logits", "scale", "gate_up", "down"],
        ["dllm"],
        domain="dllm_trt",
        top_k=K,
        activation="gelu_tanh",
    )
    inits = {
        "gate": gate_up[:, :I].copy(),
        "fc1": gate_up,
        "fc2": down,
        "scale": scale,
        "gate_up": gate_up,
        "down": down,
    }
    model = _graph([relu, geglu, dllm], inits, "com.microsoft")
    model.opset_import.append(oh.make_opsetid("dllm_trt", 1))

    for original in (model, ir.from_proto(model)):
        copy = with_cpu_standins(original)
        proto = copy if isinstance(copy, onnx.ModelProto) else ir.to_proto(copy)
        assert [(n.domain, n.op_type) for n in proto.graph.node] == [
            ("com.microsoft", "MoE"), (STANDIN_DOMAIN, "OrtMoEStandin"), (STANDIN_DOMAIN, "DllmMoEStandin")
        ]  # fmt: skip
        source = original if isinstance(original, onnx.ModelProto) else ir.to_proto(original)
        assert [n.domain for n in source.graph.node] == ["com.microsoft", "com.microsoft", "dllm_trt"]  # untouched
        outputs = _run(proto, _inputs(5), standins=True)  # the relu MoE still runs on the CPU kernel
        assert np.isfinite(outputs).all()


def test_refuses_what_it_does_not_implement():
    gate_up, down, _ = _hf_experts()
    with pytest.raises(ValueError, match="no biases"):
        with_cpu_standins(_moe(gate_up, down, bias=True, activation_type="geglu", swiglu_fusion=2))


def test_dllm_attention_standin_is_onnx_attention_over_the_graphs_mask():
    """The plugin node through its stand-in against onnxruntime's own opset-23 Attention (grouped heads, a
    bf16 node retargeted through Casts): the same values wherever a query has a valid key."""
    from dllm_trt.models.diffusion_gemma import attention_bias

    b, hq, hkv, t, s, d = 2, 4, 2, 5, 9, 16
    shapes = dict(query=[b, hq, t, d], key=[b, hkv, s, d], value=[b, hkv, s, d], bias=[b, 1, t, s])
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    valid = torch.from_numpy(rng.random((b, s)) > 0.3)
    valid[:, -t:] = True  # every query sees itself: no row without a valid key (those differ by design)
    feeds["bias"] = attention_bias(valid, t, True, None, torch.float32).expand(b, 1, t, s).numpy().copy()

    def graph(op_type: str, domain: str, dtype: int, **attrs) -> onnx.ModelProto:  # noqa: ANN003
        node = oh.make_node(op_type, list(shapes), ["y"], domain=domain, **attrs)
        inputs = [oh.make_tensor_value_info(n, dtype, shape) for n, shape in shapes.items()]
        output = oh.make_tensor_value_info("y", dtype, [b, hq, t, d])
        opsets = [oh.make_opsetid("", 23)] + ([oh.make_opsetid(domain, 1)] if domain else [])
        return oh.make_model(oh.make_graph([node], "attention", inputs, [output]), opset_imports=opsets, ir_version=10)

    expected = _run(graph("Attention", "", TensorProto.FLOAT, scale=0.5), feeds, standins=False)
    plugin = graph("DllmAttention", "dllm_trt", TensorProto.FLOAT, scale=0.5, plugin_namespace="dllm_trt",
                   plugin_version="1")  # fmt: skip
    assert _rel(_run(with_cpu_standins(plugin), feeds, standins=True), expected) <= TOL
    # a bf16 node (what a bf16 trt graph holds) reaches the fp32 stand-in through Casts, both ways
    bf16 = with_cpu_standins(ir.from_proto(graph("DllmAttention", "dllm_trt", TensorProto.BFLOAT16, scale=0.5,
                                                 plugin_namespace="dllm_trt", plugin_version="1")))  # fmt: skip
    ops = [(n.domain, n.op_type) for n in bf16.graph]
    assert ops.count(("", "Cast")) == 5 and (STANDIN_DOMAIN, "DllmAttentionStandin") in ops
