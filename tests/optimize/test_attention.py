"""fuse_attention: the count, one Attention node in and the eager ops out, equal numbers, no false matches."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.contract import ATTENTION_OP, PLUGIN_NAMESPACE
from dllm_trt.errors import DllmError
from dllm_trt.optimize.attention import fuse_attention, plugin_rule
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.rms_norm import fuse_rms_norm
from dllm_trt.optimize.rotary import fuse_rotary_embedding

CTX = PassContext("ort-cpu", "fp32", "step", {})
B, T, P, D = 2, 5, 7, 8
S = P + T
NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _const(name: str, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _model(hq=4, hkv=2, repeat=True, scaling=None, dtype=TensorProto.FLOAT, bias_shape=(B, 1, T, S),
           softmax_axis=-1, unsqueeze_axis=2, scale_input=False, head_dim=D) -> ir.Model:  # fmt: skip
    """models/diffusion_gemma.attend as the exporter writes it, after the KV concatenation."""
    nodes = [helper.make_node("Concat", [f"past_{x}", x], [f"{x}_all"], axis=2) for x in ("key", "value")]
    inits = []
    keys, values = "key_all", "value_all"
    if repeat:  # repeat_kv: [B, Hkv, S, head_dim] -> [B, Hkv, n, S, head_dim] -> [B, Hq, S, head_dim]
        expand = [B, hkv, hq // hkv, S, head_dim] if unsqueeze_axis == 2 else [B, hq // hkv, hkv, S, head_dim]
        inits += [_const("axis", [unsqueeze_axis]), _const("expand", expand), _const("heads", [B, hq, S, head_dim])]
        for x in ("key", "value"):
            nodes += [
                helper.make_node("Unsqueeze", [f"{x}_all", "axis"], [f"{x}_5d"]),
                helper.make_node("Expand", [f"{x}_5d", "expand"], [f"{x}_wide"]),
                helper.make_node("Reshape", [f"{x}_wide", "heads"], [f"{x}_rep"]),
            ]
        keys, values = "key_rep", "value_rep"
    nodes += [
        helper.make_node("Transpose", [keys], ["keys_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["query", "keys_t"], ["scores"]),
    ]
    scores = "scores"
    if scaling is not None:
        op, value = scaling
        nodes.append(helper.make_node(op, ["scores", "scale"], ["scaled"]))
        if not scale_input:
            inits.append(_const("scale", value, NP_TYPES[dtype]))
        scores = "scaled"
    nodes.append(helper.make_node("Add", [scores, "bias"], ["biased"]))
    if dtype == TensorProto.FLOAT:
        nodes.append(helper.make_node("Softmax", ["biased"], ["probs"], axis=softmax_axis))
    else:  # softmax(..., dtype=torch.float32).to(query.dtype)
        nodes += [
            helper.make_node("Cast", ["biased"], ["biased_f"], to=TensorProto.FLOAT),
            helper.make_node("Softmax", ["biased_f"], ["probs_f"], axis=softmax_axis),
            helper.make_node("Cast", ["probs_f"], ["probs"], to=dtype),
        ]
    inits += [_const("flat", [B, T, hq * head_dim])]
    nodes += [
        helper.make_node("MatMul", ["probs", values], ["heads_out"]),
        helper.make_node("Transpose", ["heads_out"], ["tokens_out"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["tokens_out", "flat"], ["out"]),
    ]
    inputs = [("query", [B, hq, T, head_dim]), ("past_key", [B, hkv, P, head_dim]),
              ("past_value", [B, hkv, P, head_dim]), ("key", [B, hkv, T, head_dim]), ("value", [B, hkv, T, head_dim]),
              ("bias", list(bias_shape))]  # fmt: skip
    if scale_input:
        inputs.append(("scale", []))
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info(name, dtype, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("out", dtype, [B, T, hq * head_dim])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model, data_prop=True))  # shapes, as the exporter's


def _feeds(model: ir.Model, masked_rows: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.inputs:
        dtype = value.dtype.numpy()
        if value.name == "bias":  # additive mask: 0 or the dtype's lowest value, as models/attention_bias builds it
            shape = [int(d) for d in value.shape]
            allowed = rng.random(shape) < 0.7
            if masked_rows:
                allowed[1, :, :2, :] = False  # left-padding queries of the second row: nothing to attend
            feeds["bias"] = np.where(allowed, 0, np.finfo(dtype).min).astype(dtype)
        elif value.name == "scale":
            feeds["scale"] = np.asarray(0.125, dtype)
        else:
            feeds[value.name] = rng.standard_normal([int(d) for d in value.shape]).astype(dtype)
    return feeds


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # test our rewrite only
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


def _attention_node(model: ir.Model) -> ir.Node:
    return next(node for node in model.graph if node.op_type == "Attention")


@pytest.mark.parametrize(
    "heads", [(4, 2, True), (4, 1, True), (2, 2, False), (4, 1, False)],
    ids=["gqa-repeat_kv", "mqa-repeat_kv", "mha", "mqa-broadcast"],
)  # fmt: skip
@pytest.mark.parametrize("scaling", [None, ("Mul", 0.125), ("Div", 8.0)], ids=["no-scale", "mul", "div"])
def test_eager_attention_fuses_into_one_node(heads, scaling):
    hq, hkv, repeat = heads
    model = _model(hq, hkv, repeat, scaling)
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert fuse_attention(model, CTX) == 1
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-6)
    ops = _ops(model)
    assert ops["Attention"] == 1
    assert ops["Softmax"] == ops["MatMul"] == ops["Expand"] == ops["Unsqueeze"] == ops["Add"] == 0
    assert ops["Concat"] == 2  # the KV concatenation stays outside the node
    node = _attention_node(model)
    assert [v.name for v in node.inputs] == ["query", "key_all", "value_all", "bias"] and len(node.outputs) == 1
    assert node.attributes["scale"].value == pytest.approx(0.125 if scaling else 1.0)
    assert node.attributes["is_causal"].value == 0


def test_mask_broadcast_over_queries_is_expanded_to_every_query_row():
    # The denoiser's padding-only bias is [B, 1, 1, S]; onnxruntime and TensorRT want [B, 1, T, S].
    model = _model(bias_shape=(B, 1, 1, S))
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert fuse_attention(model, CTX) == 1
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-6)
    mask = _attention_node(model).inputs[3]
    assert mask.producer().op_type == "Expand" and list(mask.shape) == [B, 1, T, S]


def test_float16_attention_keeps_the_float32_softmax():
    model = _model(dtype=TensorProto.FLOAT16)
    feeds = _feeds(model)
    expected = _run(model, feeds).astype(np.float32)
    assert fuse_attention(model, CTX) == 1
    # float16 products and sums in a different order: a few float16 ulps at |out| <= ~3
    np.testing.assert_allclose(_run(model, feeds).astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert _ops(model)["Cast"] == 0
    assert _attention_node(model).attributes["softmax_precision"].value == TensorProto.FLOAT


def test_fully_masked_query_rows_stay_finite():
    # Left-padding queries of the encoder: every key masked with the dtype's lowest finite value. The eager
    # softmax averages V over such a row; onnxruntime's Attention returns zeros. Both finite, the rest equal.
    model = _model()
    feeds = _feeds(model, masked_rows=True)
    expected = _run(model, feeds).reshape(B, T, -1)
    assert fuse_attention(model, CTX) == 1
    actual = _run(model, feeds).reshape(B, T, -1)
    assert np.isfinite(actual).all() and np.isfinite(expected).all()
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(actual[1, 2:], expected[1, 2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "variant",
    [dict(softmax_axis=2), dict(scaling=("Mul", 0.125), scale_input=True), dict(bias_shape=(B, 1, T, 1))],
    ids=["softmax-over-queries", "scale-not-constant", "bias-broadcast-over-keys"],
)  # fmt: skip
def test_near_misses_do_not_fuse(variant):
    model = _model(**variant)
    feeds = _feeds(model)
    expected, before = _run(model, feeds), _ops(model)
    assert fuse_attention(model, CTX) == 0
    assert _ops(model) == before
    np.testing.assert_array_equal(_run(model, feeds), expected)


def test_a_head_repeat_other_than_repeat_kv_stays_outside_the_node():
    # Heads repeated interleaved (Unsqueeze on axis 1) are not repeat_kv: the node must take the repeated
    # K/V as they are (Hq heads each) rather than the Concat outputs.
    model = _model(unsqueeze_axis=1)
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert fuse_attention(model, CTX) == 1
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-6)
    assert [v.name for v in _attention_node(model).inputs[1:3]] == ["key_rep", "value_rep"]
    assert _ops(model)["Expand"] == 2


def test_unknown_target_is_refused():
    with pytest.raises(DllmError, match="unknown target"):
        fuse_attention(_model(), PassContext("tpu", "fp32", "step", {}))


@pytest.mark.parametrize(
    "target, after_norms_and_rotary, plugin", [("ort-cpu", False, False), ("trt", True, True)],
    ids=["ort-cpu", "trt (fp32: no fused TensorRT attention, every layer's through the DllmAttention stand-in)"],
)  # fmt: skip
def test_every_attention_of_the_exported_graphs_fuses_and_parity_holds(
    tiny_export, tmp_path, target, after_norms_and_rotary, plugin, assert_step_parity
):
    out = tmp_path / "onnx"
    shutil.copytree(tiny_export, out)
    facts = json.loads((out / "manifest.json").read_text())["model"]
    layers = facts["num_layers"]
    expected = {"step": layers}
    op = ATTENTION_OP if plugin else "Attention"
    for name, count in expected.items():
        model = ir.load(tiny_export / f"{name}.onnx")  # the copy is overwritten below: read the original
        ctx = PassContext(target, "fp32", name, facts)
        if after_norms_and_rotary:  # the pipeline's order: Q then comes from RotaryEmbedding
            fuse_rms_norm(model, ctx)
            fuse_rotary_embedding(model, ctx)
        assert fuse_attention(model, ctx) == count
        ops = _ops(model)
        assert ops.get(op) == count and ops["Softmax"] == count  # what is left: the routers' softmax
        assert ops.get("Attention", 0) + ops.get(ATTENTION_OP, 0) == count
        for node in (n for n in model.graph if n.op_type == op):
            # What TensorRT's parser takes: no past inputs, one output, K/V from the concatenation outside,
            # a mask with a row per query (the plugin's inputs are the same).
            assert len(node.inputs) == 4 and len(node.outputs) == 1
            assert node.inputs[1].producer().op_type == node.inputs[2].producer().op_type == "Concat"
            assert node.inputs[3].shape[2] == node.inputs[0].shape[2]
            assert node.outputs[0].shape == node.inputs[0].shape and node.outputs[0].dtype == node.inputs[0].dtype
        ir.save(model, out / f"{name}.onnx", external_data=f"{name}.onnx.data")

    assert assert_step_parity(out).exceeds_window


@pytest.mark.parametrize(
    "precision, head_size, plugin",
    [("bf16", 512, True), ("bf16", 256, False), ("bf16", 16, False), ("fp16", 320, True), ("fp8", 512, True),
     ("nvfp4", 256, False), ("fp32", 16, True)],
)  # fmt: skip
def test_the_trt_target_takes_the_plugin_exactly_where_tensorrt_fuses_no_attention(precision, head_size, plugin):
    # the graph's final dtype decides (fp8/nvfp4 graphs compute attention in bf16), as TensorRT's fusion does
    assert plugin_rule("trt", precision)(head_size) is plugin
    assert plugin_rule("ort-cpu", precision) is None and plugin_rule("ort-cuda", precision) is None


def test_head_512_becomes_the_plugin_node_with_the_attention_inputs():
    from dllm_trt.generation.cpu_standins import standin_session_options, with_cpu_standins

    model = _model(head_dim=512)
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert fuse_attention(model, PassContext("trt", "bf16", "step", {})) == 1
    node = next(n for n in model.graph if n.op_type == ATTENTION_OP)
    assert node.domain == PLUGIN_NAMESPACE and model.opset_imports[PLUGIN_NAMESPACE] == 1
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    assert attrs == {"plugin_namespace": "dllm_trt", "plugin_version": "1", "scale": 1.0}
    assert "Attention" not in _ops(model)
    # the node computes the eager graph's attention (its CPU stand-in, the plugin's specified semantics)
    proto = ir.to_proto(with_cpu_standins(model))
    session = ort.InferenceSession(
        proto.SerializeToString(), standin_session_options(), providers=["CPUExecutionProvider"]
    )
    out = session.run(None, feeds)[0]
    # relative to the largest output: at head 512 the scores' fp32 rounding moves small outputs by 1e-5
    assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-5
