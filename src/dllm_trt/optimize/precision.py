"""convert_precision: an fp32 graph -> fp16 or bf16, keeping fp32 where the reference keeps it.

TensorRT 11 builds strongly typed networks: the graph's dtypes are the precision policy. This
pass writes that policy into the graph, following what transformers does in bf16:
  - weights (matrices, embeddings, experts, norm scales) and the activations between them in the
    low precision; RMSNormalization (stash_type=1) and Attention (softmax_precision=1, except for
    TensorRT, whose parser rejects the attribute) compute their reductions in fp32 internally, as
    the reference's `x.float()` norms and fp32 softmax do;
  - fp32 regions: the router from its softmax on (softmax, top-k, renormalisation, per-expert
    scale: `router_logits` of the fused MoE is fp32), the logits from the LM head on (softcap,
    temperature, sampling head, entropy), and anything fed by the fp32 graph inputs
    (`temperature`, `sampling_noise`).
Every value is tagged LOW, FP32 (an fp32 region: must stay fp32) or AUX (fp32 only because the
export computed helpers such as RoPE tables and masks in fp32). A node computes in fp32 if any
input is FP32, else in the low precision if any input is LOW, else as exported; Casts are inserted
where an input's dtype differs from its node's. Constants adopt their consumer's dtype. The mask
constant (fp32's most negative finite value) is first clamped to the low dtype's, so that masked
scores stay finite after the cast.
"""

from __future__ import annotations

import enum

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from dllm_trt.contract import PRECISION_DTYPES, SAMPLING_INPUTS, VISION_INPUTS, derived_name
from dllm_trt.optimize.context import PassContext

LAZY_ELEMENTS = 1 << 20  # constants larger than this are converted when saved, not when the pass runs
# fp8 and nvfp4 are bf16 graphs whose quantized weights optimize.quantize stored before this pass
LOW_DTYPES = {p: ir.DataType[d.upper()] for p, d in PRECISION_DTYPES.items() if d != "float32"}
FP32_INPUTS = (*SAMPLING_INPUTS, VISION_INPUTS[0])  # the sampling head's, and pixels: the reference scales them in fp32
# Ops whose activation inputs must be in the low precision (they carry their own fp32 internals).
LOW_ANCHORS = {"RMSNormalization", "Attention", "RotaryEmbedding"}
# Ops that start an fp32 region: the reference upcasts before them.
FP32_STARTS = {"Softmax", "LogSoftmax", "TopK"}


# Ops that only lay a weight out (the tied LM head reads Transpose(E)): the weight stays one tensor, in the
# low precision, shared with the embedding's Gather; the layout op runs in the low precision too.
WEIGHT_LAYOUT_OPS = {"Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze"}


class Tag(enum.Enum):
    LOW = "low"
    FP32 = "fp32"
    AUX = "aux"


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None or (value.producer() is not None and value.producer().op_type == "Constant")


def _is_weight(value: ir.Value | None) -> bool:
    """A float constant of rank >= 2, or one laid out by WEIGHT_LAYOUT_OPS."""
    if value is None or not _is_float(value):
        return False
    if _is_constant(value):
        return value.shape is not None and len(value.shape) >= 2
    producer = value.producer()
    return producer is not None and producer.op_type in WEIGHT_LAYOUT_OPS and _is_weight(producer.inputs[0])


def _constant_array(value: ir.Value) -> np.ndarray:
    if value.const_value is not None:
        return value.const_value.numpy()
    return value.producer().attributes["value"].value.numpy()


class _Converter:
    def __init__(self, model: ir.Model, low: ir.DataType, vocab: int, experts: int, softmax_precision: bool) -> None:
        self.softmax_precision = softmax_precision
        self.graph = model.graph
        self.low = low
        self.vocab = vocab
        self.experts = experts
        self.tags: dict[ir.Value, Tag] = {}
        self.converted: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.casts = 0

    # -- helpers -----------------------------------------------------------------
    def clamp_mask_constants(self) -> None:
        """fp32's most negative finite value (the attention mask) -> the low dtype's, still in fp32."""
        lowest = float(ml_dtypes.finfo(self.low.numpy()).min)
        for value in list(self.graph.initializers.values()):
            if value.dtype == ir.DataType.FLOAT and value.const_value is not None and value.const_value.size <= 1:
                array = value.const_value.numpy()
                if np.all(array == np.finfo(np.float32).min):
                    value.const_value = ir.tensor(np.full_like(array, lowest), name=value.name)

    def constant_as(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        """A copy of a float constant in `dtype` (cached), clipped to the dtype's finite range."""
        if value.dtype == dtype:
            return value
        key = (value, dtype)
        if key not in self.converted:
            finfo = ml_dtypes.finfo(dtype.numpy())
            name = derived_name(value.name, dtype.name.lower())

            def convert(value: ir.Value = value) -> ir.Tensor:
                array = np.clip(_constant_array(value).astype(np.float32), float(finfo.min), float(finfo.max))
                return ir.tensor(array.astype(dtype.numpy()), dtype=dtype, name=name)

            source = value.const_value
            if source is not None and source.size > LAZY_ELEMENTS:
                # converted when saved, one tensor at a time: a large model is never held in memory
                tensor = ir.LazyTensor(convert, dtype, source.shape, name=name)
            else:
                tensor = convert()
            new = ir.Value(name=tensor.name, shape=value.shape, type=ir.TensorType(dtype), const_value=tensor)
            self.graph.register_initializer(new)
            self.converted[key] = new
        return self.converted[key]

    def cast(self, value: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        key = (value, dtype)
        if key not in self.converted:
            node = ir.node("Cast", [value], attributes={"to": dtype})
            node.outputs[0].name = f"{value.name}.to_{dtype.name.lower()}"
            node.outputs[0].type = ir.TensorType(dtype)
            node.outputs[0].shape = value.shape
            self.graph.insert_before(before, node)
            self.converted[key] = node.outputs[0]
            self.casts += 1
        return self.converted[key]

    def tag_of(self, value: ir.Value) -> Tag | None:
        if not _is_float(value) or _is_constant(value):
            return None
        return self.tags.get(value, Tag.AUX)

    def set_input(self, node: ir.Node, index: int, dtype: ir.DataType) -> None:
        value = node.inputs[index]
        if value is None or not _is_float(value) or value.dtype == dtype:
            return
        replacement = self.constant_as(value, dtype) if _is_constant(value) else self.cast(value, dtype, node)
        node.replace_input_with(index, replacement)

    def set_outputs(self, node: ir.Node, dtype: ir.DataType, tag: Tag, force: bool = False) -> None:
        for out in node.outputs:
            if _is_float(out) or (force and out.dtype is None):
                out.type = ir.TensorType(dtype)
                self.tags[out] = tag

    # -- the walk ----------------------------------------------------------------
    def run(self) -> None:
        self.clamp_mask_constants()
        for value in self.graph.inputs:
            if _is_float(value):
                fp32 = value.name in FP32_INPUTS
                value.type = ir.TensorType(ir.DataType.FLOAT if fp32 else self.low)
                self.tags[value] = Tag.FP32 if fp32 else Tag.LOW
        for node in list(self.graph):
            if node.op_type == "Constant":
                continue
            self.visit(node)
        for out in list(self.graph.outputs):
            # fp32 regions reach the outputs as fp32 (logits, entropy); everything else leaves low
            if _is_float(out) and self.tags.get(out) is not Tag.FP32 and out.dtype != self.low:
                self.cast_output(out, self.low)

    def visit(self, node: ir.Node) -> None:
        op = node.op_type
        if node.domain == "dllm_trt" and op in ("DllmMoE", "RoutedMoE"):
            # (hidden, router_logits, per_expert_scale, expert weights, their scales...): routing in fp32 as
            # the reference, quantization scales (inputs 5.., contract.MOE_INPUTS) fp32 too; fp8/fp4
            # expert weights are not float values and stay as they are
            for index in range(len(node.inputs)):
                self.set_input(node, index, ir.DataType.FLOAT if index in (1, 2) or index >= 5 else self.low)
            self.set_outputs(node, self.low, Tag.LOW, force=True)  # no ONNX type inference for plugin ops
            return
        if node.domain == "dllm_trt" and op == "DllmAttention":
            # like Attention: Q, K, V and the mask in the low precision, fp32 inside (kernels.attention_triton)
            for index in range(len(node.inputs)):
                self.set_input(node, index, self.low)
            self.set_outputs(node, self.low, Tag.LOW, force=True)  # no ONNX type inference for plugin ops
            return
        if op in LOW_ANCHORS or (node.domain == "com.microsoft" and op == "MoE"):
            for index in range(len(node.inputs)):
                self.set_input(node, index, self.low)
            if op == "Attention" and self.softmax_precision:
                node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", ir.DataType.FLOAT)
            self.set_outputs(node, self.low, Tag.LOW)
            return
        if op in WEIGHT_LAYOUT_OPS and _is_weight(node.inputs[0]):
            self.set_input(node, 0, self.low)
            self.set_outputs(node, self.low, Tag.LOW)
            return
        if op in ("MatMul", "Gemm") and any(_is_weight(v) for v in node.inputs):
            for index in range(len(node.inputs)):
                self.set_input(node, index, self.low)
            logits = node.outputs[0].shape is not None and node.outputs[0].shape[-1] == self.vocab
            self.set_outputs(node, self.low, Tag.LOW)
            if logits:
                self.upcast_output(node)  # the reference takes the LM head's logits to fp32
            return
        if op in ("Gather", "GatherND") and _is_constant(node.inputs[0]) and len(node.inputs[0].shape) >= 2:
            self.set_input(node, 0, self.low)  # embedding lookups read the low-precision table
            self.set_outputs(node, self.low, Tag.LOW)
            return
        if op == "Cast":
            to = node.attributes["to"].value
            source = node.inputs[0]
            if to == ir.DataType.FLOAT and _is_float(source):
                tag = self.tag_of(source) or Tag.AUX
                dtype = ir.DataType.FLOAT if tag is not Tag.LOW else self.low
                node.attributes["to"] = ir.AttrInt64("to", dtype)
                self.set_outputs(node, dtype, tag)
            elif to == ir.DataType.FLOAT:
                self.set_outputs(node, ir.DataType.FLOAT, Tag.AUX)
            return
        tags = {self.tag_of(v) for v in node.inputs if v is not None} - {None}
        if op in FP32_STARTS or Tag.FP32 in tags:
            dtype, tag = ir.DataType.FLOAT, Tag.FP32
        elif Tag.LOW in tags:
            dtype, tag = self.low, Tag.LOW
        else:
            dtype, tag = ir.DataType.FLOAT, Tag.AUX
        for index in range(len(node.inputs)):
            self.set_input(node, index, dtype)
        self.set_outputs(node, dtype, tag)

    def upcast_output(self, node: ir.Node) -> None:
        self.tags[self.cast_output(node.outputs[0], ir.DataType.FLOAT)] = Tag.FP32

    def cast_output(self, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        """Insert Cast(value) right after its producer; every user, graph outputs included, reads it."""
        users = [(use.node, use.idx) for use in value.uses()]
        cast = ir.node("Cast", [value], attributes={"to": dtype})
        self.graph.insert_after(value.producer(), cast)
        for user, index in users:
            user.replace_input_with(index, cast.outputs[0])
        new = cast.outputs[0]
        new.type, new.shape = ir.TensorType(dtype), value.shape
        if value in self.graph.outputs:
            name = value.name
            value.name = f"{name}.before_cast"
            new.name = name
            self.graph.outputs[list(self.graph.outputs).index(value)] = new
        else:
            new.name = f"{value.name}.to_{dtype.name.lower()}"
        self.casts += 1
        return new


def convert_precision(model: ir.Model, ctx: PassContext) -> int:
    """Returns the number of Cast nodes inserted at precision boundaries."""
    if ctx.precision not in LOW_DTYPES:
        return 0
    # Every value needs its dtype to be placed in a region; rewrites may have left some untyped.
    common_passes.ShapeInferencePass(strict_mode=False)(model)
    # TensorRT's parser rejects softmax_precision ("Setting softmax precision is not supported in
    # TensorRT Attention"): inside IAttention the softmax precision is TensorRT's.
    softmax_precision = ctx.target != "trt"
    converter = _Converter(
        model, LOW_DTYPES[ctx.precision], ctx.model["vocab_size"], ctx.num_experts, softmax_precision
    )
    converter.run()
    return converter.casts
