"""Trace one step over the weightless model and optimize it with its weights left in the checkpoint."""

from __future__ import annotations

import onnx_ir as ir

from dllm_trt.export.onnx_export import TraceSpec, trace
from dllm_trt.export.softmax_precision import softmax_in_requested_dtype
from dllm_trt.export.weights import FOLD_INPUT_LIMIT, attach_weights, fold_lazy_transposes, name_after_checkpoint
from dllm_trt.models.checkpoint import TensorEntry


def lazy_graph(
    spec: TraceSpec,
    model,  # noqa: ANN001 (the skeleton spec.module was built from)
    index: dict[str, TensorEntry],
    eager_max_elements: int = FOLD_INPUT_LIMIT,
) -> ir.Model:
    """The graph the in-memory path saves, node for node, with large weights as lazy checkpoint reads.

    torch.onnx.export with optimize=True runs the optimizer right after translation; here the
    translation is kept unoptimized, given its weights (lazily), the Transposes over large weights
    are folded lazily, and then the same optimizer runs; softmax gets PyTorch's precision back
    (softmax_precision.py) and the weights take their checkpoint names.
    """
    program = trace(spec, optimize=False)
    graph = program.model.graph
    attach_weights(graph, spec.module, model, index, eager_max_elements)
    fold_lazy_transposes(graph)
    program.optimize()
    softmax_in_requested_dtype(program.model.graph)
    name_after_checkpoint(program.model.graph, spec.module, model, index)
    return program.model
