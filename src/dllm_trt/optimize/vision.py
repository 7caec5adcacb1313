"""Which passes of the pipeline act on the vision graphs, and with which function.

The vision graphs (one per max_soft_tokens, contract.vision_graph) go through the same ordered
pipeline as the step, pass by pass, so the fusion report and the per-pass parity cover them. A
pass acts on them when it is listed here: the dtype and shape passes and the norm fusion as the
step has them; RoPE and attention through their vision forms (vision_fusions.py), because the
tower's 2-D RoPE rotates each half of a head by its own axis and its key transposes come merged;
the MoE, the sampling head and the weight quantization have nothing to act on (the tower's
weights stay in the graph's precision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx_ir as ir

from dllm_trt.contract import is_vision_graph
from dllm_trt.optimize.context import PassContext

PassFn = Callable[[ir.Model, PassContext], int]


def _vision_rotary(model: ir.Model, ctx: PassContext) -> int:
    from dllm_trt.optimize.vision_fusions import fuse_axial_rotary

    return fuse_axial_rotary(model, ctx)


def _vision_attention(model: ir.Model, ctx: PassContext) -> int:
    from dllm_trt.optimize.vision_fusions import fuse_vision_attention

    return fuse_vision_attention(model, ctx)


# pass name -> the function it runs on a vision graph (None: the pass's own)
VISION_PASSES: dict[str, PassFn | None] = {
    "upcast_export": None,
    "resolve_reshape_wildcards": None,
    "fuse_rms_norm": None,
    "fuse_rotary_embedding": _vision_rotary,
    "fuse_attention": _vision_attention,
    "convert_precision": None,
}


def graph_runs(step, graphs: Iterable[str]) -> list[tuple[str, PassFn]]:  # noqa: ANN001 (pipeline.Pass)
    """(graph, function) for every graph `step` acts on: its own graphs, and the vision graphs it is listed for."""
    runs = []
    for name in graphs:
        if name in step.graphs:
            runs.append((name, step.run))
        elif is_vision_graph(name) and step.name in VISION_PASSES:
            runs.append((name, VISION_PASSES[step.name] or step.run))
    return runs


def vision_graph_files(manifest: dict) -> dict[str, str]:
    """The vision graphs of an export's manifest: name -> file (empty for a text-only export)."""
    return {name: entry["file"] for name, entry in manifest["graphs"].items() if is_vision_graph(name)}
