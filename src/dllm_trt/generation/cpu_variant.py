"""Running optimized graphs on this CPU where onnxruntime has no kernel for what they hold.

Fused MoE nodes without a CPU kernel (TensorRT's DllmMoE, com.microsoft.MoE with geglu) and the long-head
attention plugin's DllmAttention run
through Python stand-ins of their specified semantics (generation/cpu_standins.py: this proves the
graph around them, not their kernels). onnxruntime has no CPU kernels for most bfloat16 math: a
bf16 graph runs through an emulation: every bf16 tensor becomes fp32 holding bf16-rounded values
(a Cast to bf16 and back after every node that produced bf16, and on the graph inputs), so storage
rounds as in bf16 while arithmetic runs in fp32, as TensorRT's bf16 kernels accumulate. This
measures the precision policy the graph encodes, not any particular kernel. fp16 graphs run
natively: onnxruntime's CPU provider has fp16 kernels for every op they hold.

The runnable copy (the "CPU variant") is written to a directory the caller owns, never into the
artifact directory, which stays as its stage wrote it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dllm_trt.contract import ATTENTION_OP, CARRIED_FILES, ORT_MOE_DOMAIN, ORT_MOE_OP
from dllm_trt.contract import MOE_OP as DLLM_MOE
from dllm_trt.contract import PLUGIN_NAMESPACE as DLLM_DOMAIN
from dllm_trt.manifest import read_manifest, save_graphs, write_manifest

# Ops with no onnxruntime CPU kernel; they run through stand-ins.
NO_CPU_KERNEL = {(DLLM_DOMAIN, DLLM_MOE), (ORT_MOE_DOMAIN, ORT_MOE_OP), (DLLM_DOMAIN, ATTENTION_OP)}


def _graph_files(directory: Path) -> dict[str, str]:
    """Every graph the directory's manifest lists, by name."""
    return {name: entry["file"] for name, entry in read_manifest(directory)["graphs"].items()}


def _graphs(directory: Path) -> list[onnx.GraphProto]:
    return [onnx.load(str(directory / f), load_external_data=False).graph for f in _graph_files(directory).values()]


def needs_standins(directory: Path) -> bool:
    return bool(_standin_ops(directory))


def _standin_ops(directory: Path) -> set[str]:
    return {node.op_type for g in _graphs(directory) for node in g.node if (node.domain, node.op_type) in NO_CPU_KERNEL}


def holds_bfloat16(directory: Path) -> bool:
    return any(i.data_type == onnx.TensorProto.BFLOAT16 for g in _graphs(directory) for i in g.initializer)


def execution_on_cpu(directory: Path) -> str:
    """How onnxruntime on this CPU runs the graphs of `directory`, in words for a report."""
    how = []
    if holds_bfloat16(directory):
        how.append("bf16 emulated in fp32 (bf16 storage rounding, fp32 arithmetic)")
    ops = _standin_ops(directory)
    if ops & {DLLM_MOE, ORT_MOE_OP}:
        how.append("fused MoE through its CPU stand-in (the op's specified semantics, not its kernel)")
    if ATTENTION_OP in ops:
        how.append("long-head attention through its CPU stand-in (the op's specified semantics, not its kernel)")
    return "; ".join(how) or "native"


def unsupported_on_cpu(directory: Path) -> str | None:
    """Why onnxruntime on CPU cannot run these graphs even with stand-ins, or None when it can."""
    if needs_standins(directory):
        try:
            import onnxruntime_extensions  # noqa: F401
        except ImportError:
            return "plugin nodes (fused MoE, attention) need onnxruntime-extensions for their CPU stand-ins (pip it)"
    return None


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


def needs_cpu_variant(directory: Path) -> bool:
    return needs_standins(directory) or holds_bfloat16(directory)


def write_cpu_variant(directory: Path, out: Path) -> None:
    """A copy of `directory`'s graphs in `out` that onnxruntime on CPU runs: fused MoE nodes retargeted
    to their stand-ins, bf16 emulated in fp32; its manifest says float32 where bf16 was emulated."""
    from dllm_trt.generation.cpu_standins import with_cpu_standins

    standins, bf16 = needs_standins(directory), holds_bfloat16(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = _graph_files(directory)
    graphs = {name: ir.load(str(directory / file)) for name, file in files.items()}
    for name, model in graphs.items():
        if bf16:
            emulate_bfloat16(model)
        if standins:
            graphs[name] = with_cpu_standins(model)
    for carried in CARRIED_FILES:
        if (directory / carried).is_file():
            shutil.copy2(directory / carried, out / carried)
    manifest = read_manifest(directory)
    manifest["graphs"] = save_graphs(graphs, out, files)
    manifest["cpu_execution"] = execution_on_cpu(directory)
    if bf16:
        manifest["model"] = dict(manifest["model"], dtype="float32")
    write_manifest(out, manifest)
