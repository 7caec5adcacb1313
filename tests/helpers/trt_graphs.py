"""Hand-built optimized graphs with the `optimize --target trt` contract: a small registry of test models.

Not runnable in onnxruntime (DllmMoE is a TensorRT plugin); they are what lint-trt and the build's
graph rewrites read: opset 23, bf16 weights, fp32 router/softmax/entropy, opset-23 Attention with
the KV concatenation outside, RMSNormalization, DllmMoE, and the step's sampling head over its rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from dllm_trt.manifest import describe_graph, write_manifest

BF16, F32, I64, BOOL = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL

FACTS = dict(
    model_type="diffusion_gemma",
    dtype="bfloat16",
    canvas_length=8,
    sliding_window=8,
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_experts=4,
    top_k_experts=2,
    layers=[
        dict(index=0, sliding=True, head_dim=16, num_kv_heads=2, k_eq_v=False),
        dict(index=1, sliding=False, head_dim=512, num_kv_heads=1, k_eq_v=True),
    ],
    pad_token_id=0,
)
Q_HEADS, WIDTH = 2, 16
# The transformers config these graphs stand for (what `plan` and build's memory estimate read)
FACTS["text_config"] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=Q_HEADS,
    layer_types=["sliding_attention", "full_attention"],
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=512,
    num_global_key_value_heads=1,
    sliding_window=8,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=WIDTH,
    max_position_embeddings=4096,
)


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(0)
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def weight(self, stem: str, shape: list[int], dtype: int = BF16) -> str:
        name = self.name(stem)
        values = (self.rng.standard_normal(int(np.prod(shape))) * 0.1).astype(np.float32).tolist()
        self.inits.append(helper.make_tensor(name, dtype, shape, values))
        return name

    def const(self, values: list, dtype: int = I64) -> str:
        name = self.name("c")
        self.inits.append(helper.make_tensor(name, dtype, [len(values)], values))
        return name

    def scalar(self, value: float, dtype: int) -> str:
        name = self.name("s")
        self.inits.append(helper.make_tensor(name, dtype, [], [value]))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str] | str:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def _heads(b: _Builder, x: str, heads: int, dim: int) -> str:
    """[B, T, heads*dim] -> [B, heads, T, dim]"""
    r = b.op("Reshape", [x, b.const([0, 0, heads, dim])])
    return b.op("Transpose", [r], perm=[0, 2, 1, 3])


def _layer(b: _Builder, x: str, spec: dict, past_k: str, past_v: str, mask: str) -> tuple[str, str, str]:
    hidden, dim, kv = FACTS["hidden_size"], spec["head_dim"], spec["num_kv_heads"]
    h = b.op("RMSNormalization", [x, b.weight("norm", [hidden])], axis=-1, epsilon=1e-6)
    q = _heads(b, b.op("MatMul", [h, b.weight("wq", [hidden, Q_HEADS * dim])]), Q_HEADS, dim)
    k = _heads(b, b.op("MatMul", [h, b.weight("wk", [hidden, kv * dim])]), kv, dim)
    v = _heads(b, b.op("MatMul", [h, b.weight("wv", [hidden, kv * dim])]), kv, dim)
    keys = b.op("Concat", [past_k, k], axis=2)
    values = b.op("Concat", [past_v, v], axis=2)
    attn = b.op("Attention", [q, keys, values, mask], scale=1.0)
    merged = b.op("Reshape", [b.op("Transpose", [attn], perm=[0, 2, 1, 3]), b.const([0, 0, Q_HEADS * dim])])
    x = b.op("Add", [x, b.op("MatMul", [merged, b.weight("wo", [Q_HEADS * dim, hidden])])])
    flat = b.op("Reshape", [x, b.const([-1, hidden])])
    logits = b.op("Cast", [b.op("MatMul", [flat, b.weight("router", [hidden, FACTS["num_experts"]])])], to=F32)
    e, i = FACTS["num_experts"], WIDTH
    weights = [b.weight("pes", [e], F32), b.weight("gate_up", [e, 2 * i, hidden]), b.weight("down", [e, hidden, i])]
    moe = b.op(
        "DllmMoE",
        [flat, logits, *weights],
        domain="dllm_trt",
        top_k=FACTS["top_k_experts"],
        activation="gelu_tanh",
        plugin_namespace="dllm_trt",
        plugin_version="1",
    )
    x = b.op("Add", [x, b.op("Reshape", [moe, b.op("Shape", [x])])])
    return x, k, v


def _cache_inputs(dims_b: str = "batch") -> tuple[list, dict]:
    inputs, names = [], {}
    for spec in FACTS["layers"]:
        length = "cache_sliding" if spec["sliding"] else "cache_full"
        for kind in ("key", "value"):
            name = f"past_{kind}.{spec['index']}"
            shape = [dims_b, spec["num_kv_heads"], length, spec["head_dim"]]
            inputs.append(helper.make_tensor_value_info(name, BF16, shape))
            names[(kind, spec["index"])] = name
    return inputs, names


def _mask(b: _Builder, cache_mask: str, new_mask: str) -> str:
    """Additive bf16 mask [B, 1, 1, P+T] from the cache's and the new tokens' validity."""
    valid = b.op("Concat", [cache_mask, new_mask], axis=1)
    additive = b.op("Where", [valid, b.scalar(0.0, BF16), b.scalar(-1e4, BF16)])
    return b.op("Unsqueeze", [additive, b.const([1, 2])])


def _rows(b: _Builder, x: str, rows: str, first: bool) -> str:
    """x[:, :rows] (first) or x[:, rows:] along the token axis, rows a [1] int64 tensor."""
    start, end = (b.const([0]), rows) if first else (rows, b.const([2**62]))
    return b.op("Slice", [x, start, end, b.const([1])])


def step(opset: int = 23) -> onnx.ModelProto:
    """The step graph: self_conditioning's rows choose the phase (R = 0 encode, R = T denoise)."""
    b = _Builder()
    h, v = FACTS["hidden_size"], FACTS["vocab_size"]
    cache_inputs, past = _cache_inputs()
    embed = b.weight("embed", [v, h])
    embeds = b.op("Gather", [embed, "input_ids"])
    rows = b.op("Slice", [b.op("Shape", ["self_conditioning"]), b.const([1]), b.const([2])])
    conditioned = b.op("Add", [_rows(b, embeds, rows, True), "self_conditioning"])
    x = b.op("Concat", [conditioned, _rows(b, embeds, rows, False)], axis=1)
    mask = _mask(b, "cache_mask", "input_mask")
    outputs = []
    for spec in FACTS["layers"]:
        i = spec["index"]
        x, k, val = _layer(b, x, spec, past[("key", i)], past[("value", i)], mask)
        for kind, tensor in (("key", k), ("value", val)):
            b.nodes.append(helper.make_node("Identity", [tensor], [f"{kind}.{i}"], name=f"out_{kind}_{i}"))
            shape = ["batch", spec["num_kv_heads"], "new_tokens", spec["head_dim"]]
            outputs.append(helper.make_tensor_value_info(f"{kind}.{i}", BF16, shape))
    x = _rows(b, x, rows, True)
    logits = b.op("Cast", [b.op("MatMul", [x, b.op("Transpose", [embed], perm=[1, 0])])], to=F32)
    processed = b.op("Div", [logits, b.op("Unsqueeze", ["temperature", b.const([1, 2])])])  # one per row
    probs = b.op("Softmax", [processed], axis=-1)
    nodes_out = [
        helper.make_node(
            "ArgMax", [b.op("Div", [probs, "sampling_noise"])], ["sampled_ids"], name="sample", axis=-1, keepdims=0
        ),
        helper.make_node("ArgMax", [processed], ["argmax_ids"], name="argmax", axis=-1, keepdims=0),
    ]
    logp = b.op("LogSoftmax", [processed], axis=-1)
    neg = b.op("ReduceSum", [b.op("Mul", [logp, probs]), b.const([-1])], keepdims=0)
    nodes_out.append(helper.make_node("Neg", [neg], ["entropy"], name="entropy"))
    soft = b.op("MatMul", [b.op("Cast", [probs], to=BF16), embed])
    nodes_out.append(
        helper.make_node(
            "Mul", [soft, b.scalar(float(np.sqrt(h)), BF16)], ["next_self_conditioning"], name="embed_scale"
        )
    )
    b.nodes += nodes_out
    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch", "new_tokens"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch", "new_tokens"]),
        helper.make_tensor_value_info("input_mask", BOOL, ["batch", "new_tokens"]),
        helper.make_tensor_value_info("cache_mask", BOOL, ["batch", "cache_full"]),
        helper.make_tensor_value_info("self_conditioning", BF16, ["batch", "rows", h]),
        *cache_inputs,
        helper.make_tensor_value_info("temperature", F32, ["batch"]),
        helper.make_tensor_value_info("sampling_noise", F32, ["batch", "rows", v]),
    ]
    outputs += [
        helper.make_tensor_value_info("sampled_ids", I64, ["batch", "rows"]),
        helper.make_tensor_value_info("argmax_ids", I64, ["batch", "rows"]),
        helper.make_tensor_value_info("entropy", F32, ["batch", "rows"]),
        helper.make_tensor_value_info("next_self_conditioning", BF16, ["batch", "rows", h]),
    ]
    return _model(b, "step", inputs, outputs, opset)


def _model(b: _Builder, name: str, inputs: list, outputs: list, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("dllm_trt", 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="tests/helpers/trt_graphs.py")
    model.ir_version = 10
    return model


def write_optimized(out: Path, step_model: onnx.ModelProto | None = None, **manifest_overrides) -> Path:
    """An `optimize --target trt` output directory: step.onnx, manifest.json, generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "step.onnx"
    onnx.save(step_model or step(), str(path))
    manifest = dict(
        stage="optimize", target="trt", precision="bf16", model=FACTS, graphs={"step": describe_graph(path, [])},
        checkpoint=dict(path="/nowhere", hash="sha256:" + "0" * 64), opset=23,
    ) | manifest_overrides  # fmt: skip
    write_manifest(out, manifest)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    return out
