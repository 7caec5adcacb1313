"""Run fused MoE nodes that have no CPU kernel on CPU onnxruntime, through Python stand-ins.

``dllm_trt::DllmMoE`` (the TensorRT plugin's node) and ``com.microsoft::MoE`` with ``geglu`` (a
CUDA-only activation in onnxruntime 1.32) cannot run in CPU onnxruntime, yet the graphs around
them should be checked for parity on the machines that have only a CPU. ``with_cpu_standins``
returns a copy of a graph with those nodes retargeted to Python custom ops of
onnxruntime-extensions (domain ``ai.onnx.contrib``; its ``onnx_op`` does not take other domains);
``standin_session_options`` registers them and the extensions library for an InferenceSession::

    model = with_cpu_standins(onnx.load(path))                 # or an onnx_ir Model
    session = ort.InferenceSession(model.SerializeToString(), standin_session_options())

What each stand-in proves, and what it does not:

* ``DllmMoEStandin`` computes ``kernels.moe_triton.moe_reference`` (the plugin's specified
  semantics): a graph that passes through it has the right wiring, layouts, dtypes and attributes
  for the plugin. Not the plugin's kernel (``tests/kernels`` and ``tests/engines`` cover that).
  A node with quantized experts (``weight_format`` fp8 or nvfp4, contract.MOE_INPUTS) runs through
  ``DllmMoEFp8Standin`` / ``DllmMoENvfp4Standin``: exactly the quantized arithmetic, i.e. the stored
  values dequantized to fp32 (kernels.quantization.dequantize_experts), then the same fp32 math.
  Their fp8 inputs reach them through a Cast to float (exact); fp4 initializers, which onnxruntime
  1.32 can neither Cast nor dequantize on CPU ("Could not find an implementation for Cast(23)"),
  are handed over as fp32 initializers holding the same values (exact too).
* ``DllmAttentionStandin`` computes ``kernels.attention_triton.attention_reference`` (the long-head
  attention plugin's specified semantics: grouped-query attention over the graph's additive mask, fp32),
  proving the graph around the plugin node; its kernels are tested under the Triton interpreter
  (tests/kernels/test_attention_triton.py).
* ``OrtMoEStandin`` computes OUR READING of the ``com.microsoft.MoE`` spec (onnxruntime 1.32,
  ``optimize.moe`` docstring): fp32 softmax of ``router_probs`` as logits, top-k with ties to the
  lowest index, optional renormalisation, fc1 [E, fusion*I, H] with ``swiglu_fusion`` 1 (interleaved) or 2
  ([gate | up]), the activation, fc2 [E, H, I], weighted sum. It checks our wiring and weight
  layout against that reading, NOT onnxruntime's CUDA kernel, which has never run here. The
  parts it shares with the CPU kernel (routing, layouts, relu/gelu/silu/identity, interleaved
  swiglu) are tested against onnxruntime's own CPU kernel in tests/optimize/test_cpu_standins.py.

Stand-ins run in float32 only (inputs are declared float) and move every output through Python
lists (onnxruntime-extensions' PyOp protocol): fine for tiny parity graphs, slow beyond.
Dependency: ``onnxruntime-extensions>=0.15`` (only for these stand-ins).

Letters: N tokens, H hidden, E experts, K active experts, I expert width.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from dllm_trt.contract import ATTENTION_INPUTS, ATTENTION_OP, ATTENTION_SCALE, MOE_INPUTS, MOE_WEIGHT_FORMAT

STANDIN_DOMAIN = "ai.onnx.contrib"
DLLM_MOE_STANDIN = "DllmMoEStandin"
# one stand-in op per weight format: the PyOp protocol fixes an op's input count
DLLM_MOE_STANDINS = {"float": DLLM_MOE_STANDIN, "fp8": "DllmMoEFp8Standin", "nvfp4": "DllmMoENvfp4Standin"}
ORT_MOE_STANDIN = "OrtMoEStandin"
DLLM_ATTENTION_STANDIN = "DllmAttentionStandin"

# com.microsoft.MoE attributes a stand-in node always carries (defaults of the 1.32 schema);
# PyOp attributes must be present on the node to be read.
_ORT_MOE_ATTRS = {
    "k": 1,
    "activation_type": "relu",
    "swiglu_fusion": 0,
    "normalize_routing_weights": 0,
    "activation_alpha": 1.0,
    "activation_beta": 0.0,
    "swiglu_limit": math.inf,  # absent means no clamp
}
# activations onnxruntime 1.32's CPU kernel runs, with the fusion it accepts for gated ones
_CPU_ACTIVATIONS = ("relu", "gelu", "silu", "identity", "swiglu")

_REDUCED = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_registered = False


# --------------------------------------------------------------------------------------------
# The computations
# --------------------------------------------------------------------------------------------


def dllm_moe_standin(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, *scales, top_k, activation,
                     weight_format: str = "float"):  # noqa: ANN001, ANN201  # fmt: skip
    """``dllm_trt::DllmMoE`` = ``moe_reference`` over the dequantized experts (numpy in, numpy out)."""
    import torch

    from dllm_trt.kernels.moe_triton import moe_reference
    from dllm_trt.kernels.quantization import dequantize_experts

    if activation != "gelu_tanh":
        raise ValueError(f"DllmMoE activation '{activation}' is not gelu_tanh")
    gate_up_proj, down_proj = dequantize_experts(weight_format, gate_up_proj, down_proj, *scales)
    out = moe_reference(
        *(torch.from_numpy(np.asarray(a)) for a in (hidden, router_logits, per_expert_scale, gate_up_proj, down_proj)),
        top_k=int(top_k),
    )
    return out.numpy()


def _fp8_standin(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, gate_up_scale, down_scale,
                 top_k, activation):  # noqa: ANN001, ANN201  # fmt: skip
    return dllm_moe_standin(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, gate_up_scale,
                            down_scale, top_k=top_k, activation=activation, weight_format="fp8")  # fmt: skip


def _nvfp4_standin(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, gate_up_block_scale,
                   down_block_scale, gate_up_global_scale, down_global_scale, top_k, activation):  # noqa: ANN001, ANN201  # fmt: skip
    return dllm_moe_standin(
        hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, gate_up_block_scale, down_block_scale,
        gate_up_global_scale, down_global_scale, top_k=top_k, activation=activation, weight_format="nvfp4",
    )  # fmt: skip


def dllm_attention_standin(query, key, value, bias, scale):  # noqa: ANN001, ANN201
    """``dllm_trt::DllmAttention`` = ``attention_reference`` (fp32 grouped-query attention over the graph's
    additive mask; numpy in, numpy out)."""
    import torch

    from dllm_trt.kernels.attention_triton import attention_reference

    tensors = (torch.from_numpy(np.asarray(a, np.float32)) for a in (query, key, value, bias))
    return attention_reference(*tensors, scale=float(scale)).numpy()


def _gelu_tanh(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


def ort_moe_standin(
    input, router_probs, fc1_experts_weights, fc2_experts_weights,  # noqa: A002
    k, activation_type, swiglu_fusion, normalize_routing_weights, activation_alpha, activation_beta, swiglu_limit,
):  # fmt: skip  # noqa: ANN001, ANN201
    """``com.microsoft::MoE`` as we read onnxruntime 1.32's spec (routing fp32, experts float64, fp32 out)."""
    x = np.asarray(input, np.float64)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [N, H]
    logits = np.asarray(router_probs, np.float32).reshape(x.shape[0], -1)  # [N, E]
    fc1 = np.asarray(fc1_experts_weights, np.float64)  # [E, fusion*I, H]
    fc2 = np.asarray(fc2_experts_weights, np.float64)  # [E, H, I]
    k = int(k)

    # routing in fp32 as the kernels do it (exp, times the reciprocal of the sum), ties to the lowest index
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs * (np.float32(1.0) / probs.sum(-1, keepdims=True))
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [N, K]
    weights = np.take_along_axis(probs, ids, axis=-1).astype(np.float64)
    if int(normalize_routing_weights):
        weights = weights / weights.sum(-1, keepdims=True)

    gated = activation_type in ("swiglu", "geglu")
    width = fc2.shape[2]
    if fc1.shape[1] != (2 if gated else 1) * width:
        raise ValueError(f"fc1 {fc1.shape} does not fit fc2 {fc2.shape} for activation {activation_type}")
    out = np.zeros_like(x)
    for expert in np.unique(ids):
        rows, slots = np.nonzero(ids == expert)
        z = x[rows] @ fc1[expert].T  # [n_e, fusion*I]
        if gated:
            if int(swiglu_fusion) == 1:
                gate, up = z[:, 0::2], z[:, 1::2]
            elif int(swiglu_fusion) == 2:
                gate, up = z[:, :width], z[:, width:]
            else:
                raise ValueError("a gated activation needs fused fc1 weights (swiglu_fusion 1 or 2), no fc3")
            if activation_type == "geglu":
                act = _gelu_tanh(gate) * up
            else:
                limit = float(swiglu_limit)
                if math.isfinite(limit):
                    gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
                act = gate / (1.0 + np.exp(-float(activation_alpha) * gate)) * (up + float(activation_beta))
        else:
            # onnxruntime's CPU "gelu" is the tanh form (measured), so the stand-in uses it too
            functions = {
                "relu": lambda a: np.maximum(a, 0.0),
                "gelu": _gelu_tanh,
                "silu": _silu,
                "identity": lambda a: a,
            }
            if activation_type not in functions:
                raise ValueError(f"the com.microsoft.MoE stand-in does not implement activation '{activation_type}'")
            act = functions[activation_type](z)
        out[rows] += weights[rows, slots, None] * (act @ fc2[expert].T)
    return out.reshape(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Registration and sessions
# --------------------------------------------------------------------------------------------


def register_cpu_standins() -> None:
    """Declare the Python custom ops with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as exc:
        raise RuntimeError(
            "the CPU stand-ins for DllmMoE / com.microsoft.MoE need onnxruntime-extensions: "
            "pip install 'onnxruntime-extensions>=0.15'"
        ) from exc
    fp32, i64, text = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
    functions = {"float": dllm_moe_standin, "fp8": _fp8_standin, "nvfp4": _nvfp4_standin}
    for weight_format, op_type in DLLM_MOE_STANDINS.items():
        onnx_op(
            op_type=op_type, inputs=[fp32] * len(MOE_INPUTS[weight_format]), outputs=[fp32],
            attrs={"top_k": i64, "activation": text},
        )(functions[weight_format])  # fmt: skip
    onnx_op(
        op_type=DLLM_ATTENTION_STANDIN, inputs=[fp32] * len(ATTENTION_INPUTS), outputs=[fp32],
        attrs={ATTENTION_SCALE: PyCustomOpDef.dt_float},
    )(dllm_attention_standin)  # fmt: skip
    kinds = {int: i64, float: PyCustomOpDef.dt_float, str: text}
    onnx_op(
        op_type=ORT_MOE_STANDIN,
        inputs=[fp32] * 4,
        outputs=[fp32],
        attrs={name: kinds[type(default)] for name, default in _ORT_MOE_ATTRS.items()},
    )(ort_moe_standin)
    _registered = True


def standin_session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """``options`` (or new ones) with the stand-ins declared and the extensions library registered."""
    from onnxruntime_extensions import get_library_path

    register_cpu_standins()
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options


# --------------------------------------------------------------------------------------------
# Retargeting
# --------------------------------------------------------------------------------------------


def needs_standin(domain: str, op_type: str, attributes: dict) -> bool:
    """DllmMoE and DllmAttention always; com.microsoft.MoE when onnxruntime's CPU kernel would refuse it."""
    if domain == "dllm_trt" and op_type in ("DllmMoE", ATTENTION_OP):
        return True
    if domain == "com.microsoft" and op_type == "MoE":
        activation = attributes.get("activation_type", "relu")
        return activation not in _CPU_ACTIVATIONS or (activation == "swiglu" and attributes.get("swiglu_fusion") != 1)
    return False


def _standin(domain: str, op_type: str, inputs: list[str], attributes: dict, all_moe: bool):  # noqa: ANN202
    """(op_type, inputs, attributes) of the stand-in for a node, or None to leave it alone."""
    if not (needs_standin(domain, op_type, attributes) or (all_moe and (domain, op_type) == ("com.microsoft", "MoE"))):
        return None
    if op_type == ATTENTION_OP:
        if len(inputs) != len(ATTENTION_INPUTS):
            raise ValueError(f"DllmAttention with {len(inputs)} inputs: the contract's are {ATTENTION_INPUTS}")
        return DLLM_ATTENTION_STANDIN, inputs, {ATTENTION_SCALE: float(attributes.get(ATTENTION_SCALE, 1.0))}
    if op_type == "DllmMoE":
        weight_format = attributes.get(MOE_WEIGHT_FORMAT, "float")
        if weight_format not in DLLM_MOE_STANDINS or len(inputs) != len(MOE_INPUTS[weight_format]):
            raise ValueError(f"DllmMoE weight_format '{weight_format}' with {len(inputs)} inputs: not the contract's")
        attrs = {"top_k": attributes["top_k"], "activation": attributes["activation"]}
        return DLLM_MOE_STANDINS[weight_format], inputs, attrs
    padded = inputs + [""] * (8 - len(inputs))
    if any(padded[i] for i in (3, 5, 6, 7)):
        raise ValueError("the com.microsoft.MoE stand-in takes no biases and no fc3; drop them or extend the stand-in")
    if attributes.get("use_sparse_mixer", 0):
        raise ValueError("the com.microsoft.MoE stand-in does not implement use_sparse_mixer")
    attrs = {name: attributes.get(name, default) for name, default in _ORT_MOE_ATTRS.items()}
    return ORT_MOE_STANDIN, [padded[0], padded[1], padded[2], padded[4]], attrs


def _retarget_proto(model: onnx.ModelProto, all_moe: bool) -> int:
    count = 0
    for node in model.graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attributes = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
        found = _standin(node.domain, node.op_type, list(node.input), attributes, all_moe)
        if found is None:
            continue
        if found[0] != DLLM_MOE_STANDIN and found[0] in DLLM_MOE_STANDINS.values():
            raise ValueError("a DllmMoE node with quantized experts is retargeted on an onnx_ir Model only")
        op_type, inputs, attrs = found
        new = onnx.helper.make_node(op_type, inputs, list(node.output), name=node.name, domain=STANDIN_DOMAIN, **attrs)
        node.CopyFrom(new)
        count += 1
    if count and not any(o.domain == STANDIN_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(STANDIN_DOMAIN, 1))
    return count


def _fp32_copy(graph: ir.Graph, value: ir.Value) -> ir.Value:
    """An fp32 initializer with the values of a (fp4) initializer; exact."""
    name = f"{value.name}.float"
    if name not in graph.initializers:
        array = value.const_value.numpy().astype(np.float32)
        graph.register_initializer(
            ir.Value(name=name, shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(array))
        )
    return graph.initializers[name]


def _retarget_ir(model: ir.Model, all_moe: bool) -> int:
    count = 0
    for node in list(model.graph):
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        inputs = [v.name if v is not None else "" for v in node.inputs]
        found = _standin(node.domain, node.op_type, inputs, attributes, all_moe)
        if found is None:
            continue
        op_type, names, attrs = found
        by_name = {v.name: v for v in node.inputs if v is not None}
        # The stand-ins compute in float32: fp16/bf16 values go through Casts on the way in and out.
        casts, inputs = [], []
        for value in (by_name[n] for n in names):
            if value.dtype == ir.DataType.FLOAT4E2M1:  # no CPU kernel reads fp4: the same values in fp32
                value = _fp32_copy(model.graph, value)
            elif value.dtype in _REDUCED or value.dtype == ir.DataType.FLOAT8E4M3FN:
                casts.append(ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT}))
                casts[-1].outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
                value = casts[-1].outputs[0]
            inputs.append(value)
        new = ir.Node(
            STANDIN_DOMAIN, op_type, inputs, attributes=ir.convenience.convert_attributes(attrs),
            num_outputs=len(node.outputs), name=node.name,
        )  # fmt: skip
        outputs, back = list(new.outputs), []
        for index, old in enumerate(node.outputs):
            if old.dtype in _REDUCED:
                back.append(ir.node("Cast", [new.outputs[index]], attributes={"to": old.dtype}))
                outputs[index] = back[-1].outputs[0]
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [*casts, new, *back], node.outputs, outputs)
        count += 1
    if count:
        model.opset_imports.setdefault(STANDIN_DOMAIN, 1)
    return count


def with_cpu_standins(model: onnx.ModelProto | ir.Model, all_moe: bool = False) -> onnx.ModelProto | ir.Model:
    """A copy of ``model`` with DllmMoE, and com.microsoft.MoE nodes the CPU kernel refuses (all of
    them with ``all_moe``), retargeted to the stand-ins. An ir.Model copy shares its tensors; a
    ModelProto copy holds whatever data the proto held (load it without external data to keep
    pointing at the same ``.data`` file, and save the copy next to it). Open the result with
    ``standin_session_options()``.
    """
    if isinstance(model, ir.Model):
        copy = model.clone()
        _retarget_ir(copy, all_moe)
        return copy
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _retarget_proto(copy, all_moe)
    return copy
