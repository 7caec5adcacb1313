"""Resolve a Reshape's -1 where the exported graph knows the size: `resolve_reshape_wildcards`.

Pattern: Reshape(x, Concat(p0, ..., pn)) where every piece is one element, one piece is the
constant [-1], and the Reshape's output shape (recorded by torch.export, which proved it) is a
number at that axis; transformers' `view(*input_shape, -1, head_dim)` makes these, one per
projection. Emits the same Reshape with that piece replaced by the number.

Why: the step graph's token count is the sum of the self-conditioned rows and the rest
(models.diffusion_gemma.Step), an expression TensorRT's shape analysis does not reduce back to
the token count, so a -1 beside it stays unknown: the head count of Q/K/V becomes -1 and
IAttention refuses the node ("query number of heads must be divisible by key/value number of
heads"). With the head count written in, every attention input has static heads again.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dllm_trt.optimize.context import PassContext


def _one_element(value: ir.Value) -> bool:
    """A one-element 1-D piece: a constant of one value, Shape(x, start=i, end=i + 1), or so recorded."""
    if value.const_value is not None:
        return value.const_value.numpy().size == 1
    producer = value.producer()
    if producer is not None and producer.op_type == "Shape":
        start, end = producer.attributes.get("start"), producer.attributes.get("end")
        if start is not None and end is not None and start.as_int() >= 0 and end.as_int() == start.as_int() + 1:
            return True
    return value.shape is not None and value.shape.rank() == 1 and value.shape[0] == 1


def resolve_reshape_wildcards(model: ir.Model, ctx: PassContext) -> int:  # noqa: ARG001
    """Give each matching Reshape a target with the -1 replaced by the output's static size; returns how many.

    The target Concat may be shared (the exporter builds one [B, T, -1, D] for Q, K and V of different
    head counts): each Reshape gets its own copy."""
    count = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        target, out_shape = node.inputs[1], node.outputs[0].shape
        concat = target.producer() if target is not None else None
        if concat is None or concat.op_type != "Concat" or out_shape is None:
            continue
        pieces = list(concat.inputs)
        if len(pieces) != out_shape.rank() or not all(p is not None and _one_element(p) for p in pieces):
            continue
        resolved = []
        for axis, piece in enumerate(pieces):
            const = piece.const_value
            if const is not None and int(const.numpy().reshape(-1)[0]) == -1 and isinstance(out_shape[axis], int):
                size = ir.tensor(np.array([out_shape[axis]], dtype=np.int64), name=f"{node.name}.dim{axis}")
                piece = ir.Value(name=size.name, shape=ir.Shape([1]), type=ir.TensorType(size.dtype), const_value=size)
                model.graph.register_initializer(piece)
            resolved.append(piece)
        if resolved == pieces:
            continue
        new = ir.Node("", "Concat", resolved, attributes=[ir.AttrInt64("axis", 0)], name=f"{node.name}.target")
        new.outputs[0].shape, new.outputs[0].type = target.shape, target.type
        node.graph.insert_before(node, new)
        node.replace_input_with(1, new.outputs[0])
        count += 1
    return count
