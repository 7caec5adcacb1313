"""lint-trt's verdict where a TensorRT library is installed: its own parser and builder judge the graphs.

Each graph is parsed with the plugins (MoE, attention) registered and built for the preset's target with the
profiles `build` would use (TensorRT for RTX builds ahead of time anywhere; TensorRT proper needs its
GPU to build, so without one only its parser speaks). Every parser error becomes a finding naming
the node; a failed build becomes one finding with the builder's last error. Nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.trt import profiles as prof
from dllm_trt.trt.gpu_presets import GpuPreset


def parser_findings(directory: Path, manifest: dict, preset: GpuPreset, ranges: dict) -> tuple[str, list]:
    """(who judged, findings) for the graphs of an optimize --target trt directory."""
    from dllm_trt.contract import GRAPH_FILES
    from dllm_trt.engines.lint import Finding
    from dllm_trt.trt import attention_plugin, engine
    from dllm_trt.trt.gpu import detect_gpu
    from dllm_trt.trt.moe_plugin import compile_for_graphs, register_moe_plugin
    from dllm_trt.trt.trt_library import load_library

    lib = load_library(preset.library)
    build = lib.ahead_of_time or detect_gpu() is not None
    register_moe_plugin(lib.trt, arch=preset.arch)
    attention_plugin.register_attention_plugin(lib.trt, arch=preset.arch)
    findings = []
    paths = [directory / manifest["graphs"][g]["file"] for g in GRAPH_FILES]
    for op, compile_all in (("DllmMoE", compile_for_graphs), ("DllmAttention", attention_plugin.compile_for_graphs)):
        try:
            compile_all(paths, preset.arch)
        except RuntimeError as exc:  # Triton could not compile a kernel: the build would store none
            findings.append(Finding("error", "-", "-", op, str(exc)))
    for graph in GRAPH_FILES:
        io = manifest["graphs"][graph]
        try:
            parsed = engine.parse_network(lib, directory / io["file"])
        except engine.ParseError as exc:
            findings += [Finding("error", graph, node or "-", op or "parser", desc) for node, op, desc in exc.errors]
            continue
        if not build:
            continue
        engine.allow_decomposition(lib, parsed[1])
        profiles = prof.step_profiles(io, ranges, manifest["model"]["canvas_length"])
        try:
            level = engine.DEFAULT_OPT_LEVEL
            engine.build_serialized(lib, parsed, list(profiles.values()), preset.compute_capability, level, None)
        except DllmError as exc:
            findings.append(Finding("error", graph, "-", "build", str(exc)))
    target = f"{preset.sm}, ahead of time" if lib.ahead_of_time else ("this GPU" if build else "parser only: no GPU")
    return f"{lib.name} {lib.version} parser{' and builder' if build else ''} ({target})", findings
