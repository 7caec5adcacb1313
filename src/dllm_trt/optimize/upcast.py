"""upcast_export: a bf16 or fp16 export seen as the fp32 graph the other passes match.

Pattern: an export in reduced precision (a bf16 checkpoint such as the released one exports in
bf16). transformers' modules cast around their fp32 islands (`x.float()` in the norms, the router's
`softmax(dtype=float32)`, RoPE tables computed in fp32), so the graph holds a Cast at every
boundary, and the fusion patterns, written against the fp32 graph, match none of the rotary
embeddings or MoE blocks (measured: 0 of 4 and 0 of 2 on the tiny preset in bf16).

Emits: every bf16/fp16 initializer as an fp32 one of the same name (converted when saved or read,
so a large model is never held twice), every float graph input and output, and every value in
between, as fp32; every Cast between float types removed (each is now fp32 to fp32). The
function is the export's with its roundings removed; `convert_precision` then puts the precision
back by the same policy an fp32 export gets, so a bf16 checkpoint and its fp32 upcast optimize
to the same graph (bf16 values survive the round trip through fp32 exactly).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from dllm_trt.optimize.context import PassContext

REDUCED = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
FLOATS = (ir.DataType.FLOAT, *REDUCED)


def _as_fp32(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """The tensor in fp32, computed when it is read (the source stays memory-mapped until then)."""

    def convert() -> ir.Tensor:
        return ir.Tensor(np.asarray(tensor.numpy()).astype(np.float32))

    return ir.LazyTensor(convert, ir.DataType.FLOAT, tensor.shape, name=tensor.name)


def upcast_export(model: ir.Model, ctx: PassContext) -> int:  # noqa: ARG001
    """Returns how many initializers were upcast (0 for an fp32 export, which is left as it is)."""
    graph = model.graph
    reduced = [v for v in graph.initializers.values() if v.dtype in REDUCED and v.const_value is not None]
    if not reduced:
        return 0
    common_passes.ShapeInferencePass(strict_mode=False)(model)  # every value typed, so its Casts are found
    for value in reduced:
        value.const_value = _as_fp32(value.const_value)
        value.type = ir.TensorType(ir.DataType.FLOAT)
    for node in list(graph.all_nodes()):
        if node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype in REDUCED:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float32)))
        for value in node.outputs:
            if value.dtype in REDUCED:
                value.type = ir.TensorType(ir.DataType.FLOAT)
    for value in [*graph.inputs, *graph.outputs]:
        if value.dtype in REDUCED:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    float_codes = {d.value for d in FLOATS}
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
        if source is None or source.dtype not in FLOATS or node.attributes["to"].as_int() not in float_codes:
            continue
        out = node.outputs[0]
        if out in graph.outputs:  # keep the output's name: the graph output becomes the source
            node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
            continue
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)
    return len(reduced)
