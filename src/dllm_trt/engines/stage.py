"""`dllm-trt build`: `run(BuildOptions) -> BuildResult`; optimized graphs in; encoder.engine,
denoiser.engine, build_info.json, manifest.json out.

`plan_build` resolves and checks everything TensorRT is not needed for (manifest, preset,
precision, profiles, lint-trt, the graph rewrites, a memory estimate); `dry_run` stops there.
`build_engines` then checks TensorRT and the GPU, registers the plugins, rewrites each graph
(engines.rewrite), parses it, builds it with the timing cache and writes everything into a
temporary directory renamed into place at the end. The engines' precision is the graphs' own
(strongly typed networks): `optimize --precision` decides it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from dllm_trt.contract import BUILD_FORMAT, ENGINE_FILES, MANIFEST, STAGE_BUILD
from dllm_trt.engines import profiles as prof
from dllm_trt.engines.build_info import write_build_info
from dllm_trt.engines.gpu_presets import GpuPreset, check_precision, get_preset
from dllm_trt.engines.lint import GRAPHS, check_optimized_manifest, lint_artifacts
from dllm_trt.engines.rewrite import prepare_for_parser
from dllm_trt.engines.support import DEFAULT_VERSION, load_support
from dllm_trt.errors import DllmError
from dllm_trt.manifest import atomic_output, file_sha256, read_manifest, write_manifest
from dllm_trt.progress import Progress, human_bytes

_CACHE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # the KV cache is in the graphs' precision


@dataclass(frozen=True)
class BuildOptions:
    """Every build setting; None means a default resolved in plan_build (from the GPU preset)."""

    optimized: Path  # a directory written by 'dllm-trt optimize --target trt'
    output: Path
    gpu: str  # a GPU preset (engines.gpu_presets)
    profiles: tuple[str, ...] = ()  # NAME=MIN:OPT:MAX overrides of the preset's profile ranges
    timing_cache: Path | None = None  # None: ~/.cache/dllm-trt/timing-caches/<preset>-trt<version>.cache
    opt_level: int = 3  # TensorRT's own default builder optimization level
    ptx_version: int | None = None  # cap the plugins' PTX ISA (e.g. 88)
    force: bool = False  # replace a non-empty output directory
    dry_run: bool = False  # check and return the plan; needs no TensorRT or GPU
    quiet: bool = False


@dataclass(frozen=True)
class BuildResult:
    plan: dict
    info: dict | None  # build_info.json as written; None for a dry run


def default_timing_cache(preset: GpuPreset, trt_version: str | None) -> Path:
    """Per GPU preset and TensorRT version: tactic timings do not carry across either."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dllm-trt" / "timing-caches"
    return root / f"{preset.name}-trt{trt_version or 'unknown'}.cache"


def _memory_estimate(manifest: dict, ranges: dict[str, prof.DimRange], precision: str) -> dict:
    """Device memory at the profiles' maxima: both engines' weights, the KV cache, the sampling noise."""
    model = manifest["model"]
    weights = {
        g: manifest["graphs"][g]["bytes"] + sum(f["bytes"] for f in manifest["graphs"][g].get("external_data", []))
        for g in GRAPHS
    }
    batch = ranges["batch"].max
    kv = sum(
        2 * batch * spec["num_kv_heads"] * spec["head_dim"] * _CACHE_BYTES[precision]
        * (ranges["cache_sliding"].max if spec["sliding"] else ranges["cache_full"].max)
        for spec in model["layers"]
    )  # fmt: skip
    noise = batch * model["canvas_length"] * model["vocab_size"] * 4
    total = sum(weights.values()) + kv + noise
    return dict(weights=weights, kv_cache=kv, sampling_noise=noise, total=total)


def plan_build(options: BuildOptions, trt_version: str | None = None) -> dict:
    """Everything the build will do, checked without TensorRT; raises DllmError on the first blocker."""
    directory = options.optimized
    manifest = read_manifest(directory)
    check_optimized_manifest(manifest, directory)
    preset = get_preset(options.gpu)
    precision = manifest["precision"]
    check_precision(preset, precision)
    if not 0 <= options.opt_level <= 5:
        raise DllmError(f"--opt-level {options.opt_level}: TensorRT's builder optimization levels are 0..5")
    overrides = prof.parse_overrides(list(options.profiles))
    ranges = prof.resolve_ranges(preset, manifest["model"], overrides)
    from dllm_trt.engines.engine import support_key

    version = support_key(trt_version) if trt_version else DEFAULT_VERSION
    lint = lint_artifacts(directory, version, options.gpu, list(options.profiles))
    if not lint.passed:
        raise DllmError(
            f"lint-trt found {len(lint.errors)} error(s) for TensorRT {version}, first: {lint.errors[0].line()}; "
            f"run 'dllm-trt lint-trt {directory}' for all"
        )
    support = load_support(version)
    graphs = {}
    for graph in GRAPHS:
        io = manifest["graphs"][graph]
        model = onnx.load(str(directory / io["file"]), load_external_data=False)
        rewrites = prepare_for_parser(model, support)
        shapes = prof.input_shapes(io, prof.graph_ranges(ranges, graph))
        graphs[graph] = dict(file=io["file"], engine=ENGINE_FILES[graph], rewrites=rewrites, shapes=shapes)
    memory = _memory_estimate(manifest, ranges, precision)
    warnings = [f"{f.graph}: {f.op} '{f.node}': {f.message}" for f in lint.warnings]
    if memory["total"] > preset.memory_gib * 2**30 * 0.9:
        warnings.append(
            f"estimated device memory {human_bytes(memory['total'])} (two engines' weights "
            f"{human_bytes(sum(memory['weights'].values()))}, KV cache {human_bytes(memory['kv_cache'])} at the "
            f"profile maxima) exceeds 90% of the {preset.memory_gib} GB of a {preset.name}: shrink the profiles "
            "(--profile batch=..., cache_full=...) or share weights between the engines"
        )
    return dict(
        optimized=str(directory),
        gpu=preset.name,
        gpu_description=preset.description,
        compute_capability=list(preset.compute_capability),
        precision=precision,
        profiles={name: dim.as_list() for name, dim in ranges.items()},
        support_version=version,
        opt_level=options.opt_level,
        timing_cache=str(options.timing_cache or default_timing_cache(preset, trt_version)),
        graphs=graphs,
        memory_estimate=memory,
        warnings=warnings,
    )


def format_plan(plan: dict) -> str:
    lines = [
        f"build plan for {plan['gpu_description']} (sm_{''.join(map(str, plan['compute_capability']))}), "
        f"precision {plan['precision']}, optimization level {plan['opt_level']}",
        "profiles (min:opt:max): " + ", ".join(f"{k}={':'.join(map(str, v))}" for k, v in plan["profiles"].items()),
        f"timing cache: {plan['timing_cache']}",
    ]
    for graph, info in plan["graphs"].items():
        rewrites = ", ".join(f"{k} {v}" for k, v in info["rewrites"].items())
        lines.append(f"{graph}: {info['file']} -> {info['engine']} ({rewrites}; {len(info['shapes'])} dynamic inputs)")
    mem = plan["memory_estimate"]
    lines.append(f"device memory estimate: {human_bytes(mem['total'])} (weights "
                 f"{human_bytes(sum(mem['weights'].values()))}, KV {human_bytes(mem['kv_cache'])}, "
                 f"noise {human_bytes(mem['sampling_noise'])})")  # fmt: skip
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def _aux_files(directory: Path, manifest: dict) -> list[Path]:
    """Files the runtime reads beside the graphs (generation config, tokenizer), not the graphs themselves."""
    graph_files = {MANIFEST}
    for io in manifest["graphs"].values():
        graph_files.add(io["file"])
        graph_files.update(f["file"] for f in io.get("external_data", []))
    return [p for p in sorted(directory.iterdir()) if p.is_file() and p.name not in graph_files
            and not p.name.endswith((".onnx", ".data"))]  # fmt: skip


def run(options: BuildOptions) -> BuildResult:
    """The plan, and unless `dry_run` both engines built into `options.output`."""
    if options.dry_run:
        return BuildResult(plan_build(options), None)
    plan, info = build_engines(options)
    return BuildResult(plan, info)


def build_engines(options: BuildOptions) -> tuple[dict, dict]:
    """Build both engines into `options.output`; returns the plan and the build_info written there."""
    directory, out, quiet = options.optimized, options.output, options.quiet
    from dllm_trt.engines import engine as trt_build
    from dllm_trt.engines.gpu import check_gpu, detect_gpu
    from dllm_trt.engines.plugins import register_all

    progress = Progress(3 + 2 * len(GRAPHS), quiet=quiet)
    with progress.stage("TensorRT and GPU") as notes:
        trt = trt_build.import_tensorrt()
        preset = get_preset(options.gpu)
        gpu = check_gpu(preset, detect_gpu())
        notes.append(f"TensorRT {trt.__version__}, {gpu.name} ({gpu.sm})")
    with progress.stage("plan: manifest, profiles, lint-trt, rewrites") as notes:
        plan = plan_build(options, trt.__version__)
        notes.append(f"{plan['precision']}, {len(plan['warnings'])} warning(s)")
    for warning in plan["warnings"]:
        progress.note(f"warning: {warning}")
    manifest = read_manifest(directory)
    support = load_support(plan["support_version"])
    timing_cache = Path(plan["timing_cache"])
    engines = {}
    with atomic_output(out, force=options.force) as tmp:
        with progress.stage("register plugins") as notes:
            register_all(options.ptx_version)
            notes.append("dllm_trt::DllmMoE + route/bucket/expert-up/expert-down")
        for graph in GRAPHS:
            info = plan["graphs"][graph]
            with progress.stage(f"{graph}: rewrite and parse") as notes:
                source = directory / info["file"]
                model = onnx.load(str(source), load_external_data=False)
                counts = prepare_for_parser(model, support)
                network = trt_build.parse_network(model.SerializeToString(), source)
                notes.append(", ".join(f"{k} {v}" for k, v in counts.items()) + f", {network[1].num_layers} layers")
            with progress.stage(f"{graph}: build engine") as notes:
                start = time.perf_counter()
                serialized = trt_build.build_serialized(network, info["shapes"], timing_cache, options.opt_level)
                path = tmp / info["engine"]
                path.write_bytes(serialized)
                try:  # which kernels TensorRT picked, for a person; not needed to run
                    (tmp / f"{graph}.layers.json").write_text(trt_build.layer_report(serialized))
                except Exception as exc:  # noqa: BLE001
                    progress.note(f"no layer report for {graph}: {type(exc).__name__}: {exc}")
                engines[graph] = dict(
                    file=path.name,
                    bytes=path.stat().st_size,
                    sha256="sha256:" + hashlib.sha256(serialized).hexdigest(),
                    seconds=round(time.perf_counter() - start, 1),
                    rewrites=counts,
                )
                notes.append(human_bytes(path.stat().st_size))
        with progress.stage("build_info.json and manifest") as notes:
            info = dict(
                format=BUILD_FORMAT,
                tensorrt_version=trt.__version__,
                gpu=gpu.as_dict() | {"preset": preset.name},
                precision=plan["precision"],
                profiles=plan["profiles"],
                graph_profiles={g: plan["graphs"][g]["shapes"] for g in GRAPHS},
                optimized_manifest_sha256=file_sha256(directory / MANIFEST),
                checkpoint_hash=manifest.get("checkpoint", {}).get("hash"),
                opt_level=options.opt_level,
                ptx_version=options.ptx_version,
                timing_cache=str(timing_cache),
                lint=dict(version=plan["support_version"], warnings=plan["warnings"]),
                memory_estimate=plan["memory_estimate"],
                engines=engines,
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            write_build_info(tmp, info)
            write_manifest(tmp, dict(
                stage=STAGE_BUILD, target="trt", precision=plan["precision"], model=manifest["model"],
                graphs=manifest["graphs"], checkpoint=manifest.get("checkpoint", {}), opset=manifest.get("opset"),
                build=dict(gpu=preset.name, tensorrt_version=trt.__version__, engines=ENGINE_FILES),
                tools=manifest.get("tools", {}),
            ))  # fmt: skip
            for aux in _aux_files(directory, manifest):
                shutil.copy2(aux, tmp / aux.name)
            notes.append(f"{sum(e['bytes'] for e in engines.values()) / 2**30:.2f} GiB of engines")
    return plan, info
