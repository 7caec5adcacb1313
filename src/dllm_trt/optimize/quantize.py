"""quantize_weights: the fp8 and nvfp4 precisions' weights, for the trt target.

Runs on the fused fp32 graph, just before convert_precision (which then makes everything else bf16
as `--precision bf16` does: activations, norms, embedding and the tied LM head, the router's Gemm;
the router's softmax, the softcap and the sampling head stay fp32). Two rewrites:

* Every `dllm_trt::DllmMoE` node's expert weights are stored quantized, in the node's own inputs
  (contract.MOE_INPUTS, attribute `weight_format`): fp8 e4m3 values with an fp32 scale per expert
  and output channel, or NVFP4 (e2m1 values, an e4m3 scale per 16 values along the input axis, an
  fp32 scale per expert). The plugin's kernels dequantize inside the kernel (kernels.moe_triton);
  its CPU stand-in dequantizes to fp32 and runs the fp32 math (generation.cpu_standins).
* The attention q/k/v/o and the dense MLPs' gate/up/down projections (each layer's `mlp` and the
  self-conditioning block's) become weight-only fp8 in both precisions: `MatMul(x, W)` ->
  `MatMul(x, Cast(DequantizeLinear(W_q fp8 [K, N], scale fp32 [N], axis=1), bf16))`, an fp32
  scale per output channel. TensorRT fuses the DequantizeLinear and the Cast into its GEMM
  (rtx-lab FINDINGS 6: `CastMulCastFc`, fp8 weights stored; builds for SM89, SM120, SM121).

Weight-only: nothing quantizes an activation, so the result is a function of the weights alone:
deterministic, and no calibration data is needed (kernels.quantization has the arithmetic).

Why our own code and not nvidia-modelopt (0.47) for the standard ops: its ONNX quantizer
(`modelopt.onnx.quantization.quantize(quantize_mode="fp8")`) is W8A8: it inserts activation Q/DQ
whose scales it calibrates by running the graph in onnxruntime, which cannot run the DllmMoE
plugin node that every one of our trt graphs holds, and it converts the unquantized rest to its
`high_precision_dtype` (fp16 by default) where this precision keeps bf16 and fp32 regions of its
own. Weight-only fp8 per output channel is one absmax and one DequantizeLinear per weight; the
MoE plugin's experts need our own code anyway (no quantizer knows the plugin's inputs).

New weights are computed when the graph is saved (large ones lazily, one tensor at a time), from
the fp32 values of the export (a bf16 checkpoint upcast exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from dllm_trt.contract import (
    FP8_SCALE,
    MOE_INPUTS,
    MOE_OP,
    MOE_WEIGHT_FORMAT,
    NVFP4_BLOCK_SCALE,
    NVFP4_GLOBAL_SCALE,
    PLUGIN_NAMESPACE,
    QUANTIZED_PRECISIONS,
    QUANTIZED_VALUES,
    derived_name,
    unique_name,
)
from dllm_trt.kernels.quantization import (
    NVFP4_BLOCK,
    PROJECTION,
    fp8_scale,
    nvfp4_global_scale,
    nvfp4_scales,
    quantize_fp8,
    quantize_nvfp4,
)
from dllm_trt.optimize.context import PassContext

LAZY_ELEMENTS = 1 << 20  # as convert_precision: larger tensors are computed when saved


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float32)


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...],
                 make: Callable[[], np.ndarray]) -> ir.Value:  # fmt: skip
    """A new initializer whose values `make` computes (when saved, for large ones)."""
    size = int(np.prod(shape))

    def tensor() -> ir.Tensor:
        return ir.tensor(make(), dtype=dtype, name=name)

    const = ir.LazyTensor(tensor, dtype, ir.Shape(shape), name=name) if size > LAZY_ELEMENTS else tensor()
    value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=const)
    graph.register_initializer(value)
    return value


# What each format stores per expert weight [E, R, K]: (name derivation, dtype, shape, how it is computed
# from the fp32 weight), in the order of contract.MOE_INPUTS after the weights. The scales have functions
# of their own: quantizing the values is most of the cost, and each stored tensor is computed on its own.
_STORED = {
    "fp8": ([(QUANTIZED_VALUES["fp8"], ir.DataType.FLOAT8E4M3FN, lambda e, r, k: (e, r, k),
              lambda w: quantize_fp8(w)[0])],
            [(FP8_SCALE, ir.DataType.FLOAT, lambda e, r, k: (e, r), fp8_scale)]),
    "nvfp4": ([(QUANTIZED_VALUES["nvfp4"], ir.DataType.FLOAT4E2M1, lambda e, r, k: (e, r, k),
                lambda w: quantize_nvfp4(w)[0])],
              [(NVFP4_BLOCK_SCALE, ir.DataType.FLOAT8E4M3FN, lambda e, r, k: (e, r, k // NVFP4_BLOCK),
                lambda w: nvfp4_scales(w)[0]),
               (NVFP4_GLOBAL_SCALE, ir.DataType.FLOAT, lambda e, r, k: (e,), nvfp4_global_scale)]),
}  # fmt: skip


def _quantize_experts(graph: ir.Graph, node: ir.Node, fmt: str) -> None:
    """DllmMoE inputs 3, 4 (fp32 [E, 2I, H], [E, H, I]) -> the format's quantized inputs (contract.MOE_INPUTS)."""
    values, scales = _STORED[fmt]
    weights, extra = [], []  # extra: [gate_up's, down's] per scale kind
    for kinds, out in ((values, weights), (scales, extra)):
        for suffix, dtype, shape, compute in kinds:
            for source in node.inputs[3:5]:
                if source.const_value is None:
                    raise ValueError(f"{node.name}: expert weight {source.name} is not an initializer")

                def make(source: ir.Value = source, compute: Callable = compute) -> np.ndarray:
                    return compute(_array(source))

                name = unique_name(graph.initializers, derived_name(source.name, suffix))
                out.append(_initializer(graph, name, dtype, shape(*(int(d) for d in source.shape)), make))
    inputs = [*node.inputs[:3], *weights, *extra]
    assert len(inputs) == len(MOE_INPUTS[fmt])
    replacement = ir.Node(
        node.domain, node.op_type, inputs,
        attributes=[*node.attributes.values(), ir.AttrString(MOE_WEIGHT_FORMAT, fmt)],
        num_outputs=1, name=node.name,
    )  # fmt: skip
    replacement.outputs[0].type, replacement.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs, replacement.outputs)


def _quantize_projection(graph: ir.Graph, node: ir.Node, index: int) -> None:
    """MatMul input `index`, an fp32 [K, N] weight -> DequantizeLinear(fp8 [K, N], fp32 [N], axis=1)."""
    source = node.inputs[index]
    rows, cols = (int(d) for d in source.shape)
    base = source.name

    def values() -> np.ndarray:  # quantize_fp8 takes [R, K]: the weight's transpose, channels first
        return np.ascontiguousarray(quantize_fp8(_array(source).T)[0].T)

    def scale() -> np.ndarray:
        return fp8_scale(_array(source).T)

    q_name = unique_name(graph.initializers, derived_name(base, QUANTIZED_VALUES["fp8"]))
    s_name = unique_name(graph.initializers, derived_name(base, FP8_SCALE))
    q = _initializer(graph, q_name, ir.DataType.FLOAT8E4M3FN, (rows, cols), values)
    s = _initializer(graph, s_name, ir.DataType.FLOAT, (cols,), scale)
    dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 1}, name=f"{base}.dequantize")
    dq.outputs[0].name = f"{base}.dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), source.shape
    graph.insert_before(node, dq)
    node.replace_input_with(index, dq.outputs[0])


def quantize_weights(model: ir.Model, ctx: PassContext) -> int:
    """Quantize the experts of every DllmMoE node and the projections; returns how many weights."""
    if ctx.precision not in QUANTIZED_PRECISIONS:
        return 0
    graph, count = model.graph, 0
    for node in list(graph):
        if node.domain == PLUGIN_NAMESPACE and node.op_type == MOE_OP:
            _quantize_experts(graph, node, ctx.precision)
            count += 2
        elif node.op_type == "MatMul":
            for index, value in enumerate(node.inputs):
                weight = value is not None and value.const_value is not None and value.dtype == ir.DataType.FLOAT
                if weight and PROJECTION.search(value.name or "") and len(value.shape) == 2:
                    _quantize_projection(graph, node, index)
                    count += 1
    return count
