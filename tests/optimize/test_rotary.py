"""fuse_rotary_embedding: the count, RotaryEmbedding in and rotate_half out, equal numbers for both RoPE kinds."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

from dllm_trt.models.presets import PRESETS
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.rotary import fuse_rotary_embedding

CTX = PassContext("ort-cpu", "fp32", "step", {})
B, T, HQ, HKV = 2, 6, 4, 2


def _inv_freq(layer_type: str) -> np.ndarray:
    """transformers' own inverse frequencies for the tiny preset: default (sliding) or proportional (full)."""
    rope = DiffusionGemmaTextRotaryEmbedding(DiffusionGemmaTextConfig(**PRESETS["tiny"]["text"]))
    return getattr(rope, f"{layer_type}_inv_freq").numpy()


def _const(name: str, value, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _rope_nodes(x: str, out: str, dim: int, swap_halves=False, perm=(0, 2, 1, 3)) -> list:
    """apply_rotary_pos_emb(unsqueeze_dim=2) then the transpose to [B, H, T, D], as the exporter writes it."""
    half = [f"{x}.second", f"{x}.first"] if not swap_halves else [f"{x}.first", f"{x}.second"]
    return [
        helper.make_node("Mul", [x, "cos4"], [f"{x}.cos"]),
        helper.make_node("Slice", [x, "zero", f"half{dim}", "last", "one"], [f"{x}.first"]),
        helper.make_node("Slice", [x, f"half{dim}", "end", "last", "one"], [f"{x}.second"]),
        helper.make_node("Neg", [half[0]], [f"{x}.neg"]),
        helper.make_node("Concat", [f"{x}.neg", half[1]], [f"{x}.rot"], axis=-1),
        helper.make_node("Mul", [f"{x}.rot", "sin4"], [f"{x}.sin"]),
        helper.make_node("Add", [f"{x}.cos", f"{x}.sin"], [f"{x}.y"]),
        helper.make_node("Transpose", [f"{x}.y"], [out], perm=list(perm)),
    ]


def _model(layer_type: str, sin_of_a_copy: bool = False, **variant) -> tuple[ir.Model, dict]:
    inv_freq = _inv_freq(layer_type)
    dim = 2 * inv_freq.size
    nodes = [
        helper.make_node("Unsqueeze", ["positions", "minus_one"], ["pos3"]),  # [B, T, 1]
        helper.make_node("Mul", ["pos3", "inv_freq"], ["f"]),  # [B, T, D/2]
        *([helper.make_node("Mul", ["f", "one_f"], ["g"])] if sin_of_a_copy else []),  # same values, other tensor
        helper.make_node("Concat", ["f", "f"], ["emb"], axis=-1),
        helper.make_node("Concat", ["g", "g"] if sin_of_a_copy else ["f", "f"], ["emb_s"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos"]),
        helper.make_node("Sin", ["emb_s"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", "two"], ["cos4"]),
        helper.make_node("Unsqueeze", ["sin", "two"], ["sin4"]),
        *_rope_nodes("q", "q_out", dim, **variant),
        *_rope_nodes("k", "k_out", dim, **variant),
    ]
    inits = [_const("minus_one", [-1]), _const("two", [2]), _const("zero", [0]), _const("one", [1]),
             _const("last", [-1]), _const("end", [2**63 - 1]), _const(f"half{dim}", [dim // 2]),
             _const("inv_freq", inv_freq, np.float32), _const("one_f", 1.0, np.float32)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [B, T, HQ, dim]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, [B, T, HKV, dim]),
         helper.make_tensor_value_info("positions", TensorProto.FLOAT, [B, T])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q_out", "k_out")], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    rng = np.random.default_rng(0)
    feeds = {
        "q": rng.standard_normal((B, T, HQ, dim)).astype(np.float32),
        "k": rng.standard_normal((B, T, HKV, dim)).astype(np.float32),
        "positions": (rng.integers(0, 3000, (B, 1)) + np.arange(T)).astype(np.float32),  # past the window
    }
    # Shape inference gives the frequencies their [B, T, D/2] shape, as the exporter does.
    return ir.from_proto(onnx.shape_inference.infer_shapes(model)), feeds


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # test our rewrite only
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"], ids=["default", "proportional"])
def test_rotate_half_rope_fuses_for_both_rope_kinds(layer_type):
    model, feeds = _model(layer_type)
    if layer_type == "full_attention":
        assert (_inv_freq(layer_type) == 0).any(), "proportional RoPE leaves the last frequencies at zero"
    expected = _run(model, feeds)
    assert fuse_rotary_embedding(model, CTX) == 2
    for actual, wanted in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-5)  # angles up to ~3000 rad
    ops = _ops(model)
    assert ops["RotaryEmbedding"] == 2 and ops["Neg"] == ops["Slice"] == ops["Concat"] == 0
    assert ops["Cos"] == ops["Sin"] == 1  # the half-size tables, shared by q and k
    node = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    assert node.attributes["interleaved"].value == 0 and "rotary_embedding_dim" not in node.attributes


@pytest.mark.parametrize(
    "variant",
    [dict(swap_halves=True), dict(perm=(0, 2, 3, 1)), dict(sin_of_a_copy=True)],
    ids=["rotation-sign-flipped", "other-transpose", "cos-and-sin-of-different-tensors"],
)
def test_near_misses_do_not_fuse(variant):
    model, feeds = _model("sliding_attention", **variant)
    expected, before = _run(model, feeds), _ops(model)
    assert fuse_rotary_embedding(model, CTX) == 0
    assert _ops(model) == before
    for actual, wanted in zip(_run(model, feeds), expected):
        np.testing.assert_array_equal(actual, wanted)


def test_every_rope_of_the_exported_graphs_fuses_and_parity_holds(tiny_export, tmp_path, assert_step_parity):
    out = tmp_path / "onnx"
    shutil.copytree(tiny_export, out)
    facts = json.loads((out / "manifest.json").read_text())["model"]
    layers = facts["num_layers"]
    expected = {"step": 2 * layers}  # Q and K in every layer
    kinds = len({spec["sliding"] for spec in facts["layers"]})
    for name, count in expected.items():
        model = ir.load(tiny_export / f"{name}.onnx")  # the copy is overwritten below: read the original
        assert fuse_rotary_embedding(model, PassContext("ort-cpu", "fp32", name, facts)) == count
        ops = _ops(model)
        assert ops["RotaryEmbedding"] == count and ops["Neg"] == 0
        assert ops["Cos"] == ops["Sin"] == kinds  # one half-size table per RoPE kind
        ir.save(model, out / f"{name}.onnx", external_data=f"{name}.onnx.data")

    assert_step_parity(out)
