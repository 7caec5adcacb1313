"""fuse_moe per target: a tiny MoE block built as the exporter emits it, then the real tiny export.

Each target is checked for the count, the new op present and the old ops gone, and numerical
equality under onnxruntime with its graph optimisations off (only the rewrite is tested): ort-cpu
directly, trt and ort-cuda through the CPU stand-ins (``optimize.cpu_standins``), against the
unfused graph and against transformers' own router + experts.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript._internal.tape_builder import TapeBuilder

from dllm_trt.generation.cpu_standins import standin_session_options, with_cpu_standins
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import rule_misses
from dllm_trt.optimize.moe import fuse_moe, fusion_rules

TARGETS = ("trt", "ort-cuda", "ort-cpu")
NEW_OP = {"trt": ("dllm_trt", "DllmMoE"), "ort-cuda": ("com.microsoft", "MoE"), "ort-cpu": ("dllm_trt", "RoutedMoE")}
OLD_OPS = ("Softmax", "TopK", "GatherND", "ScatterElements", "MatMul", "Gelu", "Split")
FP32_TOL = 1e-5  # max|a-b| / max|b| between the exported form and the fused one (both fp32)

E, H, I, K = 8, 16, 8, 2  # noqa: E741  experts, hidden, expert width, active experts


def _ctx(target: str, top_k: int = K, num_experts: int = E) -> PassContext:
    return PassContext(target, "fp32", "step", {"num_experts": num_experts, "top_k_experts": top_k})


def moe_block(
    seed: int = 0, gelu: str = "tanh", top_k: int = K, router_gemm: bool = True, scale_input: bool = False,
    weights: dict[str, np.ndarray] | None = None, bf16: bool = False,
) -> ir.Model:  # fmt: skip
    """One MoE layer as ``export`` emits it. Inputs: router_in [N, H] (through the router's Gemm)
    or logits [N, E], and x [N, H]; output out [N, H]. ``scale_input`` makes per_expert_scale a
    graph input instead of an initializer. ``bf16``: weights and activations in bfloat16, with the
    exporter's Casts (logits and the gathered scale to fp32, the routing matrix back to bf16)."""
    rng = np.random.default_rng(seed)
    w = weights or dict(
        proj=rng.standard_normal((E, H)).astype(np.float32),
        scale=rng.uniform(0.5, 1.5, E).astype(np.float32),
        gate_up=(rng.standard_normal((E, 2 * I, H)) / 4).astype(np.float32),  # HF layout [E, 2I, H]
        down=(rng.standard_normal((E, H, I)) / 3).astype(np.float32),  # [E, H, I]
    )
    op = TapeBuilder()

    def const(values, dtype=np.int64) -> ir.Value:  # noqa: ANN001
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))

    dtype = ir.DataType.BFLOAT16 if bf16 else ir.DataType.FLOAT
    t = ir.TensorType(dtype)

    def init(name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(np.ascontiguousarray(array).astype(dtype.numpy()), dtype=dtype, name=name)
        return op.initializer(tensor, name=name)

    x = ir.Value(name="x", type=t, shape=ir.Shape(["N", H]))
    inputs = [x]
    if router_gemm:
        router_in = ir.Value(name="router_in", type=t, shape=ir.Shape(["N", H]))
        logits = op.Gemm(router_in, init("layers.0.router.proj.weight", w["proj"]), transB=1)  # [N, E]
        inputs.insert(0, router_in)
    else:
        logits = ir.Value(name="logits", type=t, shape=ir.Shape(["N", E]))
        inputs.insert(0, logits)
    if bf16:
        logits = op.Cast(logits, to=ir.DataType.FLOAT)  # softmax(..., dtype=float32)
    if scale_input:
        scale = ir.Value(name="per_expert_scale", type=t, shape=ir.Shape([E]))
        inputs.append(scale)
    else:
        scale = init("val_scale", w["scale"])
    probs = op.Softmax(logits, axis=-1)
    top_p, top_i = op.TopK(probs, const([top_k]), axis=-1, largest=1, sorted=1, _outputs=2)  # [N, K]
    weights_ = op.Div(top_p, op.ReduceSum(top_p, const([-1]), keepdims=1))
    gathered = op.GatherND(scale, op.Unsqueeze(top_i, const([-1])), batch_dims=0)
    weights_ = op.Mul(weights_, op.Cast(gathered, to=ir.DataType.FLOAT) if bf16 else gathered)
    zeros = op.Expand(const(0.0, np.float32), op.Shape(logits))
    dense = op.ScatterElements(zeros, top_i, weights_, axis=1, reduction="none")  # [N, E]
    gate_up = op.MatMul(op.Unsqueeze(x, const([0])), init("transpose_5", w["gate_up"].transpose(0, 2, 1)))
    gate, up = op.Split(gate_up, axis=2, num_outputs=2, _outputs=2)  # [E, N, I] each
    y = op.MatMul(op.Mul(op.Gelu(gate, approximate=gelu), up), init("transpose_6", w["down"].transpose(0, 2, 1)))
    routing = op.Unsqueeze(op.Transpose(dense, perm=[1, 0]), const([-1]))  # [E, N, 1]
    routing = op.Cast(routing, to=dtype) if bf16 else routing
    out = op.ReduceSum(op.Mul(y, routing), const([0]), keepdims=0)  # [N, H]
    out.name, out.type, out.shape = "out", t, ir.Shape(["N", H])
    graph = ir.Graph(inputs, [out], nodes=op.nodes, initializers=op.initializers, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def run(model: ir.Model, feeds: dict[str, np.ndarray], standins: bool = False) -> np.ndarray:
    options = standin_session_options() if standins else ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if standins:
        model = with_cpu_standins(model)
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(["out"], feeds)[0]


def fused(model: ir.Model, target: str, **ctx) -> tuple[ir.Model, int]:  # noqa: ANN003
    copy = model.clone()
    return copy, fuse_moe(copy, _ctx(target, **ctx))


def ops_of(model: ir.Model) -> list[tuple[str, str]]:
    return [(node.domain, node.op_type) for node in model.graph]


def max_rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("target", TARGETS)
def test_fuses_the_block(target):
    original = moe_block()
    model, count = fused(original, target)
    assert count == 1
    ops = ops_of(model)
    assert ops.count(NEW_OP[target]) == 1
    assert not [op for op in ops if op[1] in OLD_OPS], ops
    assert ("", "Gemm") in ops  # the router's proj stays outside
    node = next(n for n in model.graph if (n.domain, n.op_type) == NEW_OP[target])
    assert node.inputs[0].name == "x" and node.inputs[1].producer().op_type == "Gemm"

    rng = np.random.default_rng(1)
    for tokens in (1, 5, 37):  # 1 token leaves most experts unrouted: empty groups in ort-cpu
        feeds = {
            "router_in": rng.standard_normal((tokens, H), np.float32),
            "x": rng.standard_normal((tokens, H), np.float32),
        }
        expected = run(original, feeds)
        actual = run(model, feeds, standins=target != "ort-cpu")
        err = max_rel(actual, expected)
        print(f"{target} N={tokens}: max abs {np.abs(actual - expected).max():.2e} max rel {err:.2e} (tol {FP32_TOL})")
        assert err <= FP32_TOL


def test_emitted_layouts():
    """The weights each target gets, against the checkpoint's own [E, 2I, H] / [E, H, I] tensors."""
    rng = np.random.default_rng(3)
    w = dict(
        proj=rng.standard_normal((E, H)).astype(np.float32),
        scale=rng.uniform(0.5, 1.5, E).astype(np.float32),
        gate_up=rng.standard_normal((E, 2 * I, H)).astype(np.float32),
        down=rng.standard_normal((E, H, I)).astype(np.float32),
    )
    trt, _ = fused(moe_block(weights=w), "trt")
    node = next(n for n in trt.graph if n.op_type == "DllmMoE")
    assert node.domain == "dllm_trt"
    assert {k: a.value for k, a in node.attributes.items()} == dict(
        top_k=K, activation="gelu_tanh", plugin_namespace="dllm_trt", plugin_version="1"
    )
    assert [v.name for v in node.inputs[3:]] == ["layers.0.experts.gate_up_proj", "layers.0.experts.down_proj"]
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), w["scale"])
    np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), w["gate_up"])
    np.testing.assert_array_equal(node.inputs[4].const_value.numpy(), w["down"])

    cuda, _ = fused(moe_block(weights=w), "ort-cuda")
    node = next(n for n in cuda.graph if n.op_type == "MoE")
    assert {k: a.value for k, a in node.attributes.items()} == dict(
        k=K, activation_type="geglu", swiglu_fusion=2, normalize_routing_weights=1
    )
    assert node.inputs[3] is None and len(node.inputs) == 5
    np.testing.assert_array_equal(node.inputs[2].const_value.numpy(), w["gate_up"])
    np.testing.assert_allclose(node.inputs[4].const_value.numpy(), w["down"] * w["scale"][:, None, None], rtol=1e-7)

    cpu, _ = fused(moe_block(weights=w), "ort-cpu")
    node = next(n for n in cpu.graph if n.op_type == "RoutedMoE")
    assert node.overload == f"e{E}_k{K}" and len(node.inputs) == 5
    assert ("dllm_trt", "RoutedMoE", f"e{E}_k{K}") in cpu.functions
    np.testing.assert_array_equal(node.inputs[3].const_value.numpy(), w["gate_up"].transpose(0, 2, 1))  # [E, H, 2I]
    np.testing.assert_array_equal(node.inputs[4].const_value.numpy(), w["down"].transpose(0, 2, 1))  # [E, I, H]
    body = [n.op_type for n in cpu.functions["dllm_trt", "RoutedMoE", f"e{E}_k{K}"] if n.op_type != "Constant"]
    assert body.count("MatMul") == 2 and len(body) <= 40, body  # one batched MatMul per projection, not 2E


def test_routed_moe_capacity_extremes():
    """ort-cpu pads every expert to this call's largest count: one token (capacity 1, most experts
    empty) and every token on the same K experts (capacity N, the others all padding)."""
    original = moe_block(router_gemm=False)
    model, count = fused(original, "ort-cpu")
    assert count == 1
    rng = np.random.default_rng(5)
    same_row = np.tile(rng.standard_normal((1, E)).astype(np.float32), (48, 1))
    for logits in (rng.standard_normal((1, E), np.float32), same_row, rng.standard_normal((200, E), np.float32)):
        feeds = {"logits": logits, "x": rng.standard_normal((logits.shape[0], H), np.float32)}
        err = max_rel(run(model, feeds), run(original, feeds))
        print(f"N={logits.shape[0]}: max rel {err:.2e}")
        assert err <= FP32_TOL


@pytest.mark.parametrize("target", TARGETS)
def test_fused_block_matches_transformers_router_and_experts(target, hf_router_and_experts):
    """The fused node fed the router's logits (its proj output, captured) against transformers'
    DiffusionGemmaTextRouter + DiffusionGemmaTextExperts on fresh random inputs."""
    import torch

    router, experts = hf_router_and_experts(H, E, K, I)
    weights = dict(
        proj=router.proj.weight.detach().numpy(), scale=router.per_expert_scale.detach().numpy(),
        gate_up=experts.gate_up_proj.detach().numpy(), down=experts.down_proj.detach().numpy(),
    )  # fmt: skip
    model, count = fused(moe_block(router_gemm=False, weights=weights), target)
    assert count == 1
    gen = torch.Generator().manual_seed(11)
    captured = {}
    hook = router.proj.register_forward_hook(lambda _m, _i, out: captured.__setitem__("logits", out))
    for tokens in (1, 7, 64):
        routing_input = torch.randn(tokens, H, generator=gen)  # the residual stream
        expert_input = torch.randn(tokens, H, generator=gen)  # after pre_feedforward_layernorm_2
        with torch.no_grad():
            _, hf_weights, hf_index = router(routing_input)
            expected = experts(expert_input, hf_index, hf_weights).numpy()
        feeds = {"logits": captured["logits"].numpy(), "x": expert_input.numpy()}
        actual = run(model, feeds, standins=target != "ort-cpu")
        err = max_rel(actual, expected)
        print(f"{target} N={tokens} vs transformers: max abs {np.abs(actual - expected).max():.2e} max rel {err:.2e}")
        assert err <= FP32_TOL
    hook.remove()


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_block_fuses_and_weights_stay_bf16(target):
    """Structure only: onnxruntime's CPU provider has no bf16 MatMul, so nothing is run."""
    model, count = fused(moe_block(bf16=True), target)
    assert count == 1
    node = next(n for n in model.graph if (n.domain, n.op_type) == NEW_OP[target])
    weights = [v for v in node.inputs[3:] if v is not None]
    assert weights and {v.const_value.dtype for v in weights} == {ir.DataType.BFLOAT16}
    assert node.inputs[1].producer().op_type == "Cast" and node.outputs[0].dtype == ir.DataType.BFLOAT16
    if target == "trt":  # logits fp32 (the exporter's Cast), per_expert_scale cast to fp32 for the plugin
        assert node.inputs[1].producer().attributes["to"].value == ir.DataType.FLOAT
        assert node.inputs[2].producer().attributes["to"].value == ir.DataType.FLOAT
    if target == "ort-cuda":  # router_probs must share T with the input: cast back to bf16
        assert node.inputs[1].producer().attributes["to"].value == ir.DataType.BFLOAT16


def _probe_weights() -> dict[str, np.ndarray]:
    """Expert e writes gelu_tanh(1) * weight into hidden channel e only (for x = ones): the
    channels that are non-zero in the output are the experts the router picked."""
    gate_up = np.zeros((E, 2 * I, H), np.float32)
    gate_up[:, :I] = 1.0 / H  # gate = 1
    gate_up[:, I:] = 1.0 / H  # up = 1
    down = np.zeros((E, H, I), np.float32)
    for expert in range(E):
        down[expert, expert] = 1.0 / I
    return dict(proj=np.zeros((E, H), np.float32), scale=np.linspace(0.5, 1.5, E).astype(np.float32),
                gate_up=gate_up, down=down)  # fmt: skip


def _adversarial_logits(kind: str, rows: int = 64) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "all negative":
        return (-1e3 + rng.standard_normal((rows, E))).astype(np.float32)
    logits = (-50 + rng.standard_normal((rows, E)) * 1e-4).astype(np.float32)  # everything close
    if kind == "near ties":  # the top K+1 a few fp32 ulps of the logits apart, in shuffled slots
        for row in logits:
            slots = rng.permutation(E)[: K + 1]
            row[slots] = -10.0 - 1e-5 * np.arange(K + 1)
        return logits
    if kind == "exact ties":  # K+1 equal maxima straddle the top-K boundary: lowest index wins
        for row in logits:
            row[rng.permutation(E)[: K + 1]] = -10.0
        return logits
    raise ValueError(kind)


# Not ("trt", "exact ties"): the DllmMoE stand-in is moe_reference, whose torch.topk has no specified tie order
# on CPU, so the cell would judge torch, not the graph; the plugin kernel's lowest-index rule is tested in
# tests/kernels.
ADVERSARIAL = [
    (t, k) for t in TARGETS for k in ("all negative", "near ties", "exact ties") if (t, k) != ("trt", "exact ties")
]


@pytest.mark.parametrize(("target", "kind"), ADVERSARIAL)
def test_expert_ids_agree_on_adversarial_logits(target, kind):
    original = moe_block(router_gemm=False, weights=_probe_weights())
    model, count = fused(original, target)
    assert count == 1
    logits = _adversarial_logits(kind)
    feeds = {"logits": logits, "x": np.ones((logits.shape[0], H), np.float32)}
    expected = run(original, feeds)[:, :E] != 0  # [N, E] picked experts (ONNX TopK: lowest index on ties)
    actual = run(model, feeds, standins=target != "ort-cpu")[:, :E] != 0
    assert expected.sum(axis=1).tolist() == [K] * logits.shape[0]
    agree = (expected == actual).all(axis=1).mean()
    print(f"{target} {kind}: expert-ID agreement {100 * agree:.1f}% of {logits.shape[0]} tokens")
    assert agree == 1.0


@pytest.mark.parametrize(
    ("case", "target", "build", "ctx"),
    [
        ("erf gelu is not DiffusionGemma's activation", "ort-cpu", dict(gelu="none"), {}),
        ("top-k differs from the model's", "trt", dict(top_k=3), {}),
        ("experts count differs from the model's", "ort-cpu", {}, dict(num_experts=E + 1)),
        ("per_expert_scale not constant: cannot fold into fc2", "ort-cuda", dict(scale_input=True), {}),
    ],
)
def test_does_not_fuse(case, target, build, ctx):
    model = moe_block(**build)
    before = ops_of(model)
    misses = rule_misses(model, fusion_rules(model, _ctx(target, **ctx)))
    assert fuse_moe(model, _ctx(target, **ctx)) == 0, case
    assert ops_of(model) == before
    best = max(misses.values(), default=(0, ""))
    print(case, "->", best)
    if "gelu" not in build:  # erf Gelu does not even match the pattern; the others fail the check, with a reason
        assert best[0] >= 100 and best[1]  # a check failed (not only a partial match), and says why


# --------------------------------------------------------------------------------------------
# The real tiny export
# --------------------------------------------------------------------------------------------


def _fuse_artifacts(src, dst, target: str, standins: bool) -> dict[str, int]:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    counts = {}
    for graph in ("step",):
        model = ir.load(dst / f"{graph}.onnx")
        counts[graph] = fuse_moe(model, PassContext(target, "fp32", graph, manifest["model"]))
        if standins:
            model = with_cpu_standins(model)
        ir.save(model, dst / f"{graph}.onnx", external_data=f"{graph}.onnx.data")
    return counts


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_export_fused_keeps_parity(target, tiny_export, tiny_ckpt, tmp_path):
    from dllm_trt.generation.step import OnnxRuntimeStep
    from dllm_trt.models.checkpoint import load_model
    from dllm_trt.parity.step_parity import step_parity

    layers = len(json.loads((tiny_export / "manifest.json").read_text())["model"]["layers"])
    standins = target != "ort-cpu"
    counts = _fuse_artifacts(tiny_export, tmp_path / "fused", target, standins)
    assert counts == {"step": layers}
    for graph in ("step",):
        ops = ops_of(ir.load(tmp_path / "fused" / f"{graph}.onnx"))
        assert not [op for op in ops if op[1] in ("TopK", "ScatterElements", "GatherND")], graph
    # OnnxRuntimeStep's sessions register the stand-ins' library when a graph uses them
    result = step_parity(load_model(tiny_ckpt), OnnxRuntimeStep.from_artifacts(tmp_path / "fused"))
    for comparison in result.comparisons:
        print(target, comparison.to_dict())
    assert result.passed
