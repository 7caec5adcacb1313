"""Running optimized graphs on this CPU, where onnxruntime can, to measure their parity.

onnxruntime has no CPU kernels for bfloat16 math. A bf16 graph is therefore measured through an
emulation: every bf16 tensor becomes fp32 holding bf16-rounded values (a Cast to bf16 and back
after every node that produced bf16, and on the graph inputs), so storage rounds as in bf16 while
arithmetic runs in fp32, as TensorRT's bf16 kernels accumulate. This measures the precision
policy the graph encodes, not any particular kernel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dllm_trt.manifest import read_manifest, write_manifest

# Ops with no onnxruntime CPU kernel, and why.
NO_CPU_KERNEL = {
    ("dllm_trt", "DllmMoE"): "DllmMoE is a TensorRT plugin op",
    ("com.microsoft", "MoE"): "com.microsoft.MoE with geglu has only a CUDA kernel",
}
EMULATED = "bf16-emulated"


def _graphs(directory: Path) -> list[onnx.GraphProto]:
    return [onnx.load(str(directory / f), load_external_data=False).graph for f in ("encoder.onnx", "denoiser.onnx")]


def unsupported_on_cpu(directory: Path) -> str | None:
    """Why onnxruntime on CPU cannot run these graphs, or None when it can (bf16 is emulated)."""
    for graph in _graphs(directory):
        for node in graph.node:
            reason = NO_CPU_KERNEL.get((node.domain, node.op_type))
            if reason:
                return reason
    return None


def holds_bfloat16(directory: Path) -> bool:
    return any(i.data_type == onnx.TensorProto.BFLOAT16 for g in _graphs(directory) for i in g.initializer)


def emulate_bfloat16(model: ir.Model) -> None:
    """In place: bf16 values -> fp32 values rounded through bf16 (see the module docstring)."""
    graph = model.graph
    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT

    def round_trip(value: ir.Value, after: ir.Node | None) -> None:
        users = [(use.node, use.idx) for use in value.uses()]  # before the Casts become users too
        down = ir.node("Cast", [value], attributes={"to": bf16})
        up = ir.node("Cast", [down.outputs[0]], attributes={"to": fp32})
        down.outputs[0].type = ir.TensorType(bf16)
        up.outputs[0].type = ir.TensorType(fp32)
        up.outputs[0].shape = value.shape
        if after is None:
            graph.insert_before(graph.node(0), [down, up])
        else:
            graph.insert_after(after, [down, up])
        for user, index in users:
            user.replace_input_with(index, up.outputs[0])
        if value in graph.outputs:
            name = value.name
            value.name = f"{name}.unrounded"
            up.outputs[0].name = name
            graph.outputs[list(graph.outputs).index(value)] = up.outputs[0]

    for value in list(graph.initializers.values()):
        if value.dtype == bf16:
            array = value.const_value.numpy().astype(np.float32)
            value.const_value = ir.tensor(array, name=value.name)
            value.type = ir.TensorType(fp32)
    for value in graph.inputs:
        if value.dtype == bf16:
            value.type = ir.TensorType(fp32)
            round_trip(value, None)
    for node in list(graph):
        if node.op_type == "Cast" and node.attributes["to"].value == bf16:
            node.attributes["to"] = ir.AttrInt64("to", fp32)
            node.outputs[0].type = ir.TensorType(fp32)
            round_trip(node.outputs[0], node)
            continue
        for out in node.outputs:
            if out.dtype == bf16:
                out.type = ir.TensorType(fp32)
                round_trip(out, node)


def open_cpu_step(directory: Path):  # noqa: ANN201
    """An onnxruntime CPU step over these graphs; bf16 graphs through the emulation."""
    from dllm_trt.optimize import GRAPH_FILES, save_graphs
    from dllm_trt.runtime.step import OnnxRuntimeStep

    if not holds_bfloat16(directory):
        return OnnxRuntimeStep.from_artifacts(directory)
    emulated = directory / EMULATED
    shutil.rmtree(emulated, ignore_errors=True)
    emulated.mkdir()
    graphs = {name: ir.load(str(directory / file)) for name, file in GRAPH_FILES.items()}
    for model in graphs.values():
        emulate_bfloat16(model)
    manifest = read_manifest(directory)
    manifest["graphs"] = save_graphs(graphs, emulated)
    manifest["model"] = dict(manifest["model"], dtype="float32")
    write_manifest(emulated, manifest)
    return OnnxRuntimeStep.from_artifacts(emulated)
