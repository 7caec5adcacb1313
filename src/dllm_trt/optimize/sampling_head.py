"""add_sampling_head: the logits never leave the step graph.

Matches: the step's `logits` output [B, R, V] (softcapped fp32, over the R rows a denoise step
samples; R = 0 in an encoder pass) and the token-embedding Gather fed by `input_ids` (its data is
the tied embedding E [V, H], followed by a Mul by the embedding scale sqrt(H)).

Emits, inside the graph, everything the sampler needs from one denoise step, computed as
generation.sampler.sampling_head and the reference do:
    processed = logits / temperature                         (temperature: new input, [B] fp32: one per
                                                               row, so rows at different steps share a call)
    probs     = Softmax(processed)
    sampled_ids = ArgMax(probs / sampling_noise)              (sampling_noise: new input [B, R, V],
                                                               the Exp(1) noise torch.multinomial draws)
    argmax_ids  = ArgMax(processed)
    entropy     = -ReduceSum(Max(LogSoftmax(processed), fmin) * probs)   (Categorical(logits).entropy)
    next_self_conditioning = (probs of processed in the embedding dtype) @ E * sqrt(H)
For `ort-cpu` each ArgMax is emitted as Squeeze(TopK(x, 1) indices): the same index (ONNX TopK
puts the lower index first on a tie, as ArgMax returns the first maximum) and faster on
onnxruntime's CPU kernels (README, "Measurements behind the passes").
It replaces the `logits` output by sampled_ids, argmax_ids [B, R] int64, entropy [B, R] fp32 and
next_self_conditioning [B, R, H]. Outputs 93x smaller than the logits (at the released sizes)
leave the device. Letters: B batch, R rows (the canvas, or none), V vocab, H hidden.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dllm_trt.contract import LOGITS, SAMPLING_INPUTS, SAMPLING_OUTPUTS, STEP_INPUTS
from dllm_trt.optimize.context import PassContext

TEMPERATURE, SAMPLING_NOISE = SAMPLING_INPUTS
SAMPLED_IDS, ARGMAX_IDS, ENTROPY, NEXT_SELF_CONDITIONING = SAMPLING_OUTPUTS


def _embedding(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """The embedding matrix E and the embedding scale, found from the Gather of the input ids."""
    canvas = next(v for v in graph.inputs if v.name == STEP_INPUTS[0])
    gather = next(use.node for use in canvas.uses() if use.node.op_type == "Gather")
    embed = gather.inputs[0]
    scale_mul = next(use.node for use in gather.outputs[0].uses() if use.node.op_type == "Mul")
    scale = next(v for v in scale_mul.inputs if v is not gather.outputs[0])
    return embed, scale


def _const(graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
    tensor = ir.tensor(value, name=name)
    out = ir.Value(name=name, shape=ir.Shape(value.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(out)
    return out


def fused_nodes(model: ir.Model, ctx: PassContext) -> list[ir.Node]:
    """The head's last node (what makes next_self_conditioning): the head has no op of its own to count."""
    output = next((v for v in model.graph.outputs if v.name == NEXT_SELF_CONDITIONING), None)
    return [output.producer()] if output is not None and output.producer() is not None else []


def add_sampling_head(model: ir.Model, ctx: PassContext) -> int:
    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == LOGITS), None)
    if logits is None:
        return 0  # not a step in logits form (already has a head, or another graph)
    embed, embed_scale = _embedding(graph)
    batch, canvas, vocab = logits.shape.dims
    hidden = embed.shape.dims[1]

    temperature = ir.Value(name=TEMPERATURE, shape=ir.Shape([batch]), type=ir.TensorType(ir.DataType.FLOAT))
    noise = ir.Value(name=SAMPLING_NOISE, shape=ir.Shape([batch, canvas, vocab]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.extend([temperature, noise])
    fmin = _const(graph, "sampling_head.float32_min", np.array(np.finfo(np.float32).min, dtype=np.float32))
    axes = _const(graph, "sampling_head.last_axis", np.array([-1], dtype=np.int64))
    row_axes = _const(graph, "sampling_head.row_axes", np.array([1, 2], dtype=np.int64))

    one = _const(graph, "sampling_head.k1", np.array([1], dtype=np.int64)) if ctx.target == "ort-cpu" else None
    tape = ir.tape.Tape(graph)

    def last_axis_argmax(x: ir.Value) -> ir.Value:
        if one is None:
            return tape.op("ArgMax", [x], attributes={"axis": -1, "keepdims": 0})
        _, indices = tape.op_multi_out("TopK", [x, one], attributes={"axis": -1}, num_outputs=2)
        return tape.op("Squeeze", [indices, axes])

    processed = tape.op("Div", [logits, tape.op("Unsqueeze", [temperature, row_axes])])  # [B, C, V] / [B, 1, 1]
    probs = tape.op("Softmax", [processed], attributes={"axis": -1})
    sampled = last_axis_argmax(tape.op("Div", [probs, noise]))
    argmax = last_axis_argmax(processed)
    log_probs = tape.op("Max", [tape.op("LogSoftmax", [processed], attributes={"axis": -1}), fmin])
    entropy = tape.op("Neg", [tape.op("ReduceSum", [tape.op("Mul", [log_probs, probs]), axes],
                                      attributes={"keepdims": 0})])  # fmt: skip
    # The reference hands the processed logits on in the embedding dtype, then softmaxes in fp32.
    embed_dtype = embed.dtype
    sc_probs = probs
    if embed_dtype != ir.DataType.FLOAT:
        sc_logits = tape.op("Cast", [tape.op("Cast", [processed], attributes={"to": embed_dtype})],
                            attributes={"to": ir.DataType.FLOAT})  # fmt: skip
        sc_probs = tape.op("Cast", [tape.op("Softmax", [sc_logits], attributes={"axis": -1})],
                           attributes={"to": embed_dtype})  # fmt: skip
    scale = embed_scale
    if embed_scale.dtype != embed_dtype:
        scale = tape.op("Cast", [embed_scale], attributes={"to": embed_dtype})
    soft = tape.op("Mul", [tape.op("MatMul", [sc_probs, embed]), scale])  # [B, C, H]

    for node in tape.nodes:
        graph.append(node)
        for out in node.outputs:  # later passes (precision) read every value's dtype
            if node.op_type == "ArgMax" or (node.op_type == "TopK" and out is node.outputs[1]):
                out.type = ir.TensorType(ir.DataType.INT64)
            elif node.op_type == "Cast":
                out.type = ir.TensorType(ir.DataType(node.attributes["to"].value))
            else:
                out.type = ir.TensorType(next(v.dtype for v in node.inputs if v is not None and v.dtype is not None))
    for value, name, dtype, shape in (
        (sampled, SAMPLED_IDS, ir.DataType.INT64, [batch, canvas]),
        (argmax, ARGMAX_IDS, ir.DataType.INT64, [batch, canvas]),
        (entropy, ENTROPY, ir.DataType.FLOAT, [batch, canvas]),
        (soft, NEXT_SELF_CONDITIONING, embed_dtype, [batch, canvas, hidden]),
    ):
        value.name = name
        value.type = ir.TensorType(dtype)
        value.shape = ir.Shape(shape)
    graph.outputs.remove(logits)
    graph.outputs.extend([sampled, argmax, entropy, soft])
    return 1
