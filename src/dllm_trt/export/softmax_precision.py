"""Softmax in the precision PyTorch computes it: `softmax(x, dtype=float32)` of a bf16/fp16 `x`.

PyTorch casts `x` to the requested dtype and then takes the softmax (at::softmax: `input.toType(dtype)`
before `_softmax`). torch.onnx's translation (onnxscript torchlib `aten_softmax`) emits the Softmax in
`x`'s own dtype and casts its result. In a bf16 export that rounds every attention and router
probability to bf16 before anything reads it: at the released widths (128 experts, near-uniform
router probabilities at 1/128 apart by less than bf16's resolution) the router's top-8 then differs
from transformers' on most tokens. Found by `validate --per-layer` on a full-width bf16 export.
"""

from __future__ import annotations

import onnx_ir as ir

_LOW = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)


def softmax_in_requested_dtype(graph: ir.Graph) -> int:
    """Pattern: `Cast(Softmax(x), to=T)` with x bf16/fp16 and T wider (fp32), the Softmax read by that Cast only.
    Emits `Softmax(Cast(x, to=T))`, whose output replaces the old Cast's. Returns how many it rewrote."""
    rewritten = 0
    for node in list(graph):
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        x, probs = node.inputs[0], node.outputs[0]
        users = list(probs.uses())
        if x.dtype not in _LOW or len(users) != 1 or probs in graph.outputs:
            continue
        cast = users[0].node
        if (
            cast.op_type != "Cast"
            or cast.attributes["to"].value != ir.DataType.FLOAT
            or cast.outputs[0] in graph.outputs
        ):
            continue
        up = ir.node("Cast", [x], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_input_float")
        up.outputs[0].type, up.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), x.shape
        graph.insert_before(node, up)
        node.replace_input_with(0, up.outputs[0])
        probs.type = ir.TensorType(ir.DataType.FLOAT)
        ir.convenience.replace_all_uses_with(cast.outputs[0], probs)
        graph.remove(cast, safe=True)
        rewritten += 1
    return rewritten
