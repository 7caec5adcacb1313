"""`dllm-trt build`: `run(BuildOptions) -> BuildResult`; the optimized step graph in; step.engine,
build_info.json, manifest.json out.

One engine, one copy of the weights, for the encoder pass (no rows) and the denoise step (a row per
canvas token): one optimization profile covering both, or with `profile_per_phase` one per phase
(trt.profiles says what each costs).

`plan_build` resolves and checks everything no TensorRT is needed for (manifest, preset, library,
precision, profiles, lint-trt's pre-flight, a memory estimate); `dry_run` stops there.
`build_engines` then loads the preset's library (TensorRT on the GPU itself, TensorRT for RTX ahead
of time on any machine), registers the MoE plugin for the target architecture, parses each graph as
it is (optimize wrote it for TensorRT), builds it with its profiles, checks what was built, and writes everything into
a temporary directory renamed into place at the end. The engines' precision is the graphs' own
(strongly typed networks): `optimize --precision` decides it.

What was built, judged per engine: every DllmMoE node became one MoE plugin layer, every DllmAttention
node (attention TensorRT has no fused kernel for, trt.attention_plugin) one attention plugin layer, each
with its kernels stored; every attention node became an IAttention layer; those not marked decomposable
were fused (the builder fails rather than decompose them); the fused-attention kernels the builder lists
are counted in the report.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from dllm_trt.contract import (
    ATTENTION_OP,
    BUILD_FORMAT,
    ENGINE_FILES,
    GOLDEN_DIR,
    GRAPH_FILES,
    MANIFEST,
    MOE_OP,
    PRECISION_DTYPES,
    STAGE_BUILD,
    is_vision_graph,
)
from dllm_trt.engines.lint import check_optimized_manifest, lint_artifacts
from dllm_trt.errors import DllmError
from dllm_trt.manifest import atomic_output, file_sha256, read_manifest, write_manifest
from dllm_trt.progress import Progress, human_bytes
from dllm_trt.trt import profiles as prof
from dllm_trt.trt.build_info import write_build_info
from dllm_trt.trt.engine import DEFAULT_OPT_LEVEL
from dllm_trt.trt.gpu_presets import GpuPreset, check_precision, get_preset


@dataclass(frozen=True)
class BuildOptions:
    """Every build setting; None means a default resolved in plan_build (from the GPU preset)."""

    optimized: Path  # a directory written by 'dllm-trt optimize --target trt'
    output: Path
    gpu: str  # a GPU preset (trt.gpu_presets)
    profiles: tuple[str, ...] = ()  # NAME=MIN:OPT:MAX overrides of the preset's profile ranges
    timing_cache: Path | None = None  # None: ~/.cache/dllm-trt/timing-caches/<preset>-trt<version>.cache
    opt_level: int = DEFAULT_OPT_LEVEL  # TensorRT's own default builder optimization level
    ptx_version: int | None = None  # cap the PTX ISA of the MoE plugin's kernels (e.g. 88)
    force: bool = False  # replace a non-empty output directory
    dry_run: bool = False  # check and return the plan; needs no TensorRT or GPU
    profile_per_phase: bool = False  # two optimization profiles (prompt, canvas) instead of one (trt.profiles)
    golden: Path | None = None  # validate's golden/ for this graph, copied beside the engine (parity.golden)
    quiet: bool = False


@dataclass(frozen=True)
class BuildResult:
    plan: dict
    info: dict | None  # build_info.json as written; None for a dry run


def default_timing_cache(preset: GpuPreset, trt_version: str | None) -> Path:
    """Per GPU preset and TensorRT version: tactic timings do not carry across either."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dllm-trt" / "timing-caches"
    return root / f"{preset.name}-trt{trt_version or 'unknown'}.cache"


def _memory_estimate(directory: Path, manifest: dict, ranges: dict[str, prof.DimRange], precision: str) -> dict:
    """Device memory at the profiles' maxima: the engine's weights (once), the KV cache, and the larger
    phase's activations, as `dllm-trt plan` computes them (engines.memory_plan)."""
    from dllm_trt.engines import memory_plan

    weights = {
        g: manifest["graphs"][g]["bytes"] + sum(f["bytes"] for f in manifest["graphs"][g].get("external_data", []))
        for g in [*GRAPH_FILES, *vision_graph_names(manifest)]
    }
    meta = memory_plan.meta_model(memory_plan.load_config(str(directory))[1])
    batch, context = ranges["batch"].max, ranges["cache_full"].max
    kv = memory_plan.kv_cache_bytes(meta, batch, context, precision, sliding=ranges["cache_sliding"].max)
    activations = memory_plan.activation_bytes(meta, batch, context, ranges["new_tokens"].max, precision)
    total = sum(weights.values()) + kv + activations
    return dict(weights=weights, kv_cache=kv, activations=activations, total=total)


def vision_graph_names(manifest: dict) -> list[str]:
    """The vision graphs an optimized directory holds (none for a text-only model)."""
    return [g for g in manifest["graphs"] if is_vision_graph(g)]


def _graph_counts(model: onnx.ModelProto, precision: str) -> dict[str, int]:
    """What the built network must hold: MoE plugin nodes, attention nodes, those with no fused kernel."""
    from dllm_trt.engines.lint import GraphInfo
    from dllm_trt.trt.support import fuses_attention

    info = GraphInfo(model)
    attention = [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    dtype = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}[PRECISION_DTYPES[precision]]  # fp8/nvfp4: bf16
    fuses = {n.name: fuses_attention(dtype, info.last_dim(n.input[0]) or 0) for n in attention}
    live = _live_nodes(model)  # the builder drops what no output needs: such attention builds no kernel
    moe = sum(n.op_type == MOE_OP for n in model.graph.node)
    return dict(
        moe=moe,
        attention_plugin=sum(n.op_type == ATTENTION_OP for n in model.graph.node),
        attention=len(attention),
        attention_decomposable=sum(not f for f in fuses.values()),
        attention_fused_live=sum(f for name, f in fuses.items() if name in live),
    )


def _live_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes some graph output depends on."""
    producers = {out: node for node in model.graph.node for out in node.output}
    live, todo = set(), [o.name for o in model.graph.output]
    while todo:
        node = producers.get(todo.pop())
        if node is not None and node.name not in live:
            live.add(node.name)
            todo += [name for name in node.input if name]
    return live


def plan_build(options: BuildOptions, trt_version: str | None = None) -> dict:
    """Everything the build will do, checked without TensorRT; raises DllmError on the first blocker."""
    directory = options.optimized
    manifest = read_manifest(directory)
    check_optimized_manifest(manifest, directory)
    if options.golden is not None:
        from dllm_trt.parity.golden import check_golden

        check_golden(options.golden, directory)
    preset = get_preset(options.gpu)
    precision = manifest["precision"]
    check_precision(preset, precision)
    if not 0 <= options.opt_level <= 5:
        raise DllmError(f"--opt-level {options.opt_level}: TensorRT's builder optimization levels are 0..5")
    overrides = prof.parse_overrides(list(options.profiles))
    ranges = prof.resolve_ranges(preset, manifest["model"], overrides)
    lint = lint_artifacts(directory, None, options.gpu, list(options.profiles))
    if not lint.passed:
        raise DllmError(
            f"lint-trt found {len(lint.errors)} error(s), first: {lint.errors[0].line()}; "
            f"run 'dllm-trt lint-trt {directory}' for all"
        )
    graphs = {}
    # the vision engines beside the step's, one per vision graph (vision.engine, vision-70.engine, ...)
    engine_files = {**ENGINE_FILES, **{g: f"{g}.engine" for g in vision_graph_names(manifest)}}
    for graph, engine_file in engine_files.items():
        io = manifest["graphs"][graph]
        model = onnx.load(str(directory / io["file"]), load_external_data=False)
        if is_vision_graph(graph):
            profiles = prof.vision_profiles(io, ranges)
        else:
            profiles = prof.step_profiles(io, ranges, manifest["model"]["canvas_length"], options.profile_per_phase)
        expected = _graph_counts(model, precision) | dict(profiles=len(profiles))
        graphs[graph] = dict(file=io["file"], engine=engine_file, expected=expected, profiles=profiles)
    memory = _memory_estimate(directory, manifest, ranges, precision)
    warnings = [f"{f.graph}: {f.op} '{f.node}': {f.message}" for f in lint.warnings]
    if memory["total"] > preset.memory_gib * 2**30 * 0.9:
        warnings.append(
            f"estimated device memory {human_bytes(memory['total'])} (weights "
            f"{human_bytes(sum(memory['weights'].values()))}, KV cache {human_bytes(memory['kv_cache'])}, "
            f"activations {human_bytes(memory['activations'])} at the profile maxima) exceeds 90% of the "
            f"{preset.memory_gib} GB of a {preset.name}: shrink the profiles (--profile batch=..., "
            "new_tokens=..., cache_full=...) or quantize the experts"
        )
    return dict(
        optimized=str(directory),
        gpu=preset.name,
        gpu_description=preset.description,
        compute_capability=list(preset.compute_capability),
        library=preset.library,
        gpu_needed_to_build=preset.needs_gpu,
        precision=precision,
        profiles={name: dim.as_list() for name, dim in ranges.items()},
        opt_level=options.opt_level,
        timing_cache=str(options.timing_cache or default_timing_cache(preset, trt_version)),
        graphs=graphs,
        memory_estimate=memory,
        warnings=warnings,
    )


def format_plan(plan: dict) -> str:
    where = "on that GPU" if plan["gpu_needed_to_build"] else "ahead of time, on any machine"
    lines = [
        f"build plan for {plan['gpu_description']} (sm_{''.join(map(str, plan['compute_capability']))}) with "
        f"{plan['library']} ({where}), precision {plan['precision']}, optimization level {plan['opt_level']}",
        "profiles (min:opt:max): " + ", ".join(f"{k}={':'.join(map(str, v))}" for k, v in plan["profiles"].items()),
    ]
    for graph, info in plan["graphs"].items():
        want = info["expected"]
        lines.append(
            f"{graph}: {info['file']} -> {info['engine']} ({want['moe']} MoE plugin layers, "
            f"{want.get('attention_plugin', 0)} attention plugin layers (no fused kernel; no scores in memory), "
            f"{want['attention']} "
            f"attention layers of which {want['attention_decomposable']} decomposed (no fused kernel for the dtype and "
            f"head size); profiles {', '.join(info['profiles'])} over {len(next(iter(info['profiles'].values())))} "
            "dynamic inputs)"
        )
    mem = plan["memory_estimate"]
    lines.append(
        f"device memory estimate: {human_bytes(mem['total'])} (weights "
        f"{human_bytes(sum(mem['weights'].values()))}, KV {human_bytes(mem['kv_cache'])}, "
        f"activations {human_bytes(mem['activations'])}, as 'dllm-trt plan' estimates them)"
    )
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def _aux_files(directory: Path, manifest: dict) -> list[Path]:
    """Files the runtime reads beside the graphs (generation config, tokenizer), not the graphs themselves."""
    graph_files = {MANIFEST}
    for io in manifest["graphs"].values():
        graph_files.add(io["file"])
        graph_files.update(f["file"] for f in io.get("external_data", []))
    return [
        p
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in graph_files and not p.name.endswith((".onnx", ".data", ".json", ".md"))
    ]


def run(options: BuildOptions) -> BuildResult:
    """The plan, and unless `dry_run` the engine built into `options.output`."""
    if options.dry_run:
        return BuildResult(plan_build(options), None)
    plan, info = build_engines(options)
    return BuildResult(plan, info)


def judge_engine(
    graph: str, expected: dict, network: dict, fused_kernels: int, stored_kernels: int, stored_attention: int = 0
) -> list[str]:
    """What the built engine lacks against the graph: a problem per line, none when it is whole.
    `stored_kernels`, `stored_attention`: the MoE and attention plugins' kernel sets found in the engine."""
    problems = []
    attention_plugins = expected.get("attention_plugin", 0)
    if stored_attention < attention_plugins:
        problems.append(f"{graph}: {attention_plugins} attention plugin layers but {stored_attention} stored kernels")
    if network["plugins"].get(ATTENTION_OP, 0) != attention_plugins:
        problems.append(
            f"{graph}: {attention_plugins} DllmAttention nodes but {network['plugins'].get(ATTENTION_OP, 0)} "
            "attention plugin layers in the network"
        )
    if stored_kernels < expected["moe"]:  # TensorRT swallows a plugin callback's exception: look
        problems.append(f"{graph}: {expected['moe']} MoE plugin layers but {stored_kernels} stored kernel sets")
    if network["plugins"].get(MOE_OP, 0) != expected["moe"]:
        problems.append(
            f"{graph}: {expected['moe']} DllmMoE nodes but {network['plugins'].get(MOE_OP, 0)} MoE "
            "plugin layers in the network"
        )
    if network["attention"] != expected["attention"]:
        problems.append(
            f"{graph}: {expected['attention']} Attention nodes but {network['attention']} attention "
            "layers in the network"
        )
    if network["attention_decomposable"] != expected["attention_decomposable"]:
        problems.append(
            f"{graph}: {expected['attention_decomposable']} attention nodes without a fused kernel but "
            f"{network['attention_decomposable']} decomposable attention layers"
        )
    profiles = expected.get("profiles", 1)  # the builder lists every profile's kernels
    if fused_kernels < expected["attention_fused_live"] * profiles:
        problems.append(
            f"{graph}: {expected['attention_fused_live']} attention nodes must fuse in each of {profiles} "
            f"profile(s), but the engine lists {fused_kernels} fused attention kernel(s)"
        )
    return problems


def build_engines(options: BuildOptions) -> tuple[dict, dict]:
    """Build the engine into `options.output`; returns the plan and the build_info written there."""
    from dllm_trt.trt import attention_plugin
    from dllm_trt.trt import engine as trt_engine
    from dllm_trt.trt.gpu import check_gpu, detect_gpu
    from dllm_trt.trt.moe_plugin import KERNELS_MAGIC, RUNTIME_REQUIREMENT, compile_for_graphs, register_moe_plugin
    from dllm_trt.trt.trt_library import load_library

    directory, out = options.optimized, options.output
    progress = Progress(4 + 2 * (len(ENGINE_FILES) + len(vision_graph_names(read_manifest(directory)))),
                        quiet=options.quiet)  # fmt: skip
    with progress.stage("plan: manifest, preset, profiles, lint-trt pre-flight") as notes:
        plan = plan_build(options)
        notes.append(f"{plan['precision']}, {plan['library']}, {len(plan['warnings'])} warning(s)")
    for warning in plan["warnings"]:
        progress.note(f"warning: {warning}")
    preset = get_preset(options.gpu)
    with progress.stage(f"{preset.library} and the target") as notes:
        lib = load_library(preset.library)
        gpu = check_gpu(preset, detect_gpu()) if preset.needs_gpu else None
        plan["timing_cache"] = str(options.timing_cache or default_timing_cache(preset, lib.version))
        notes.append(
            f"{lib.name} {lib.version}, "
            + (f"{gpu.name} ({gpu.sm})" if gpu else f"ahead of time for {preset.sm}, no GPU needed")
        )
    manifest = read_manifest(directory)
    engines = {}
    with atomic_output(out, force=options.force) as tmp:
        with progress.stage("the plugins (MoE, attention): register, compile their kernels") as notes:
            register_moe_plugin(lib.trt, arch=preset.arch, ptx_version=options.ptx_version)
            paths = [directory / info["file"] for info in plan["graphs"].values()]
            shapes = compile_for_graphs(paths, preset.arch, options.ptx_version)
            notes.append(f"dllm_trt::DllmMoE, {len(shapes)} shape(s) compiled for sm_{preset.arch}")
            attention_plugin.register_attention_plugin(lib.trt, arch=preset.arch, ptx_version=options.ptx_version)
            attention_shapes = attention_plugin.compile_for_graphs(paths, preset.arch, options.ptx_version)
            if attention_shapes:
                notes.append(f"dllm_trt::DllmAttention, {len(attention_shapes)} shape(s)")
        for graph, info in plan["graphs"].items():
            with progress.stage(f"{graph}: parse") as notes:
                parsed = trt_engine.parse_network(lib, directory / info["file"])
                trt_engine.allow_decomposition(lib, parsed[1])
                network = trt_engine.summarize_network(lib, parsed[1]).to_dict()
                notes.append(
                    f"{network['layers']} layers, {network['attention']} attention, "
                    f"{sum(network['plugins'].values())} plugin"
                )
            with progress.stage(f"{graph}: build") as notes:
                start = time.perf_counter()
                timing_cache = Path(plan["timing_cache"]) if not lib.ahead_of_time else None
                serialized, layers = trt_engine.build_serialized(
                    lib,
                    parsed,
                    list(info["profiles"].values()),
                    preset.compute_capability,
                    options.opt_level,
                    timing_cache,
                )
                fused = trt_engine.fused_attention_kernels(layers)
                problems = judge_engine(
                    graph, info["expected"], network, fused, serialized.count(KERNELS_MAGIC),
                    serialized.count(attention_plugin.KERNELS_MAGIC),
                )  # fmt: skip
                if problems:
                    raise DllmError("the built engine is not the graph: " + "; ".join(problems))
                path = tmp / info["engine"]
                path.write_bytes(serialized)
                (tmp / f"{graph}.layers.txt").write_text("\n".join(layers) + "\n")
                engines[graph] = dict(
                    file=path.name,
                    bytes=len(serialized),
                    sha256="sha256:" + hashlib.sha256(serialized).hexdigest(),
                    seconds=round(time.perf_counter() - start, 1),
                    network=network,
                    fused_attention_kernels=fused,
                    engine_layers=len(layers),
                )
                notes.append(f"{human_bytes(len(serialized))}, {fused} fused attention kernel(s)")
        with progress.stage("build_info.json and manifest") as notes:
            info = dict(
                format=BUILD_FORMAT,
                library=lib.name,
                tensorrt_version=lib.version,
                gpu=dict(
                    preset=preset.name,
                    name=preset.description,
                    compute_capability=list(preset.compute_capability),
                    built_on=gpu.as_dict() if gpu else None,
                ),
                precision=plan["precision"],
                profiles=plan["profiles"],
                graph_profiles={g: plan["graphs"][g]["profiles"] for g in plan["graphs"]},
                optimized_manifest_sha256=file_sha256(directory / MANIFEST),
                checkpoint_hash=manifest.get("checkpoint", {}).get("hash"),
                opt_level=options.opt_level,
                ptx_version=options.ptx_version,
                timing_cache=plan["timing_cache"] if not lib.ahead_of_time else None,
                runtime_requirements=dict(
                    RUNTIME_REQUIREMENT,
                    python_plugins=[
                        *RUNTIME_REQUIREMENT["python_plugins"],
                        *([attention_plugin.RUNTIME_REQUIREMENT] if attention_shapes else []),
                    ],
                ),  # fmt: skip
                lint=dict(warnings=plan["warnings"]),
                memory_estimate=plan["memory_estimate"],
                engines=engines,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            write_build_info(tmp, info)
            # the engines are this directory's graphs: what inspect verifies, with the I/O they were built from
            graphs = {
                g: dict(manifest["graphs"][g], file=e["file"], bytes=e["bytes"], sha256=e["sha256"], external_data=[],
                        nodes=e["network"]["layers"])
                for g, e in engines.items()
            }  # fmt: skip
            write_manifest(tmp, dict(
                stage=STAGE_BUILD, target="trt", precision=plan["precision"], model=manifest["model"], graphs=graphs,
                checkpoint=manifest.get("checkpoint", {}), opset=manifest.get("opset"),
                build=dict(gpu=preset.name, library=lib.name, tensorrt_version=lib.version,
                           engines={g: i["engine"] for g, i in plan["graphs"].items()}),
                tools=manifest.get("tools", {}),
            ))  # fmt: skip
            for aux in _aux_files(directory, manifest):
                shutil.copy2(aux, tmp / aux.name)
            if options.golden is not None:
                from dllm_trt.parity.golden import copy_golden

                copy_golden(options.golden, directory, tmp)
                notes.append(f"{GOLDEN_DIR}/ copied")
            notes.append(f"{human_bytes(sum(e['bytes'] for e in engines.values()))} of engines")
    return plan, info
