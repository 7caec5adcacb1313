"""`dllm-trt optimize`: `run(OptimizeOptions) -> OptimizeResult`; exported graphs -> fused graphs per target.

Reads an export directory, runs the ordered pipeline (optimize/pipeline.py) over the step graph,
measures parity against transformers after each pass (or only at the end), and
writes the rewritten graphs, an updated manifest and `fusion_report.json`/`.md`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from dllm_trt.contract import (
    CARRIED_FILES,
    FUSION_REPORT,
    GRAPH_FILES,
    PRECISION_DTYPES,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    QUANTIZED_TARGETS,
    SAMPLING_OUTPUTS,
    SELF_CONDITIONING_FILE,
    STAGE_EXPORT,
    STAGE_OPTIMIZE,
    STEP,
    TARGETS,
)
from dllm_trt.errors import CheckFailed, DllmError
from dllm_trt.manifest import (
    atomic_output,
    check_external_data,
    describe_graph,
    external_data_entries,
    file_sha256,
    read_manifest,
    save_graphs,
    tool_versions,
    write_manifest,
)
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import count_fusions
from dllm_trt.optimize.pipeline import CONVERT, PIPELINE, QUANTIZE, Pass, clean_up, diff_counts, op_counts
from dllm_trt.optimize.report import write_fusion_report
from dllm_trt.optimize.vision import graph_runs, vision_graph_files
from dllm_trt.progress import Progress

PARITY_MODES = ("each", "final", "none")


@dataclass(frozen=True)
class OptimizeOptions:
    artifacts: Path  # an export directory
    output: Path
    target: str  # one of contract.TARGETS
    precision: str = "fp32"  # one of contract.PRECISIONS
    parity: str = "each"  # each | final | none: when to measure parity against transformers
    seed: int = 0  # of the parity check's random inputs
    force: bool = False  # replace a non-empty output directory
    reference: Path | None = None  # the checkpoint, if it moved since export
    quiet: bool = False
    passes: tuple[Pass, ...] | None = None  # None: the whole PIPELINE
    # Write graphs whose attention or MoE layers a rule left unfused (trt, ort-cuda); they are listed either way.
    allow_unfused: bool = False


@dataclass(frozen=True)
class OptimizeResult:
    output: Path
    manifest: dict
    failed_passes: list[str]  # passes after which judged parity failed
    unfused: list[str]  # one line per layer a fusion missed (the rule's reason), as the report lists them


def _stage_manifest(source: dict, target: str, precision: str, graphs: dict, source_hash: str, dtype: str) -> dict:
    model = dict(source["model"])
    model["dtype"] = dtype  # the dtype of the graphs' float inputs (cache, self-conditioning)
    return dict(
        stage=STAGE_OPTIMIZE,
        target=target,
        precision=precision,
        source=dict(stage=STAGE_EXPORT, manifest_sha256=source_hash),
        checkpoint=source["checkpoint"],
        model=model,
        opset=source["opset"],
        tools=tool_versions(),
        graphs=graphs,
    )


def _check_quantizable(precision: str, target: str, model: dict) -> None:
    """Refuse, before any work, a quantized precision the target's graphs or the model's widths cannot take."""
    if precision not in QUANTIZED_PRECISIONS:
        return
    if target not in QUANTIZED_TARGETS:
        raise DllmError(
            f"--precision {precision} quantizes the experts of the TensorRT MoE plugin: use --target "
            f"{' or '.join(QUANTIZED_TARGETS)} (the {target} graphs' MoE node takes no quantized weights)"
        )
    if precision == "nvfp4":
        from dllm_trt.kernels.quantization import NVFP4_BLOCK

        text = model.get("text_config", {})
        widths = dict(hidden_size=model["hidden_size"], moe_intermediate_size=text.get("moe_intermediate_size", 0))
        odd = {name: width for name, width in widths.items() if width % NVFP4_BLOCK}
        if odd:
            raise DllmError(
                f"nvfp4 quantizes blocks of {NVFP4_BLOCK} values along the experts' input axes, and "
                + ", ".join(f"{name} {width}" for name, width in odd.items())
                + f" is not a multiple of {NVFP4_BLOCK}; use --precision fp8"
            )


def _measure(reference, directory: Path, seed: int, dtype: str) -> dict:  # noqa: ANN001
    from dllm_trt.generation.step import OnnxRuntimeStep
    from dllm_trt.parity.step_parity import step_parity
    from dllm_trt.parity.vision_parity import artifact_vision_parity

    step = OnnxRuntimeStep.from_artifacts(directory)
    result = step_parity(reference, step, seed=seed, tolerance_dtype=dtype)
    result.comparisons += artifact_vision_parity(reference, step, directory, dtype)
    failed = [c.name for c in result.comparisons if not c.passed]
    # fp32 graphs must match; reduced precision is measured and reported against an informative
    # bound (a router top-k flip under rounding is a legitimate precision effect, not a bug).
    judged = dtype == "float32"
    return dict(measured=True, judged=judged, execution=step.execution, passed=result.passed, failed=failed,
                result=result.to_dict())  # fmt: skip


def run(options: OptimizeOptions) -> OptimizeResult:
    source, out, target, precision = options.artifacts, options.output, options.target, options.precision
    parity, seed, force, quiet = options.parity, options.seed, options.force, options.quiet
    if target not in TARGETS:
        raise DllmError(f"unknown target '{target}'; choose one of: {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise DllmError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if parity not in PARITY_MODES:
        raise DllmError(f"unknown --parity '{parity}'; choose one of: {', '.join(PARITY_MODES)}")
    manifest = read_manifest(source, stage=STAGE_EXPORT)
    _check_quantizable(precision, target, manifest["model"])
    source_hash = file_sha256(source / "manifest.json")
    passes = PIPELINE if options.passes is None else options.passes
    active = [p for p in passes if precision in p.precisions and target in p.targets]
    progress = Progress(total=len(active) + 1 + (parity != "none"), quiet=quiet)

    reference = None
    if parity != "none":
        with progress.stage("loading the reference (transformers)") as notes:
            from dllm_trt.models.checkpoint import checkpoint_hash, load_model, safetensors_files

            checkpoint = options.reference or Path(manifest["checkpoint"]["path"])
            if not (checkpoint / "config.json").is_file():
                raise DllmError(
                    f"the checkpoint {checkpoint} the export came from is gone; pass --reference CKPT or --parity none"
                )
            if checkpoint_hash(checkpoint, safetensors_files(checkpoint)) != manifest["checkpoint"]["hash"]:
                raise DllmError(f"{checkpoint} is not the checkpoint {source} was exported from (hash differs)")
            reference = load_model(checkpoint)
            notes.append(str(checkpoint))

    files = GRAPH_FILES | vision_graph_files(manifest)  # the vision graphs where the export has a tower
    graphs = {name: ir.load(str(source / file)) for name, file in files.items()}
    dtype = manifest["model"]["dtype"]
    entries: list[dict] = []
    unfused: list[str] = []
    required_misses: list[str] = []  # fail once every pass that must fuse has run, naming all their misses
    last_required = max((i for i, p in enumerate(active) if target in p.required_for), default=-1)
    with atomic_output(out, force=force) as tmp:
        scratch = tmp / ".scratch"
        for index, step in enumerate(active):
            with progress.stage(f"{step.name} ({target}, {precision})") as notes:
                entry: dict = dict(name=step.name, graphs={})
                for name, run_pass in graph_runs(step, graphs):
                    ctx = PassContext(target, precision, name, manifest["model"])
                    before = op_counts(graphs[name])
                    matched = run_pass(graphs[name], ctx)
                    clean_up(graphs[name])
                    after = op_counts(graphs[name])
                    entry["graphs"][name] = dict(matched=matched, ops_before=before, ops_after=after,
                                                 changed=diff_counts(before, after))  # fmt: skip
                    if step.census is not None and name == STEP:  # the census is the text model's
                        count = count_fusions(graphs[name], ctx, step.census)
                        entry["graphs"][name]["fusion"] = count.to_dict()
                        missed = [miss.line(count.op) for miss in count.misses]
                        unfused += missed
                        if target in step.required_for:
                            required_misses += missed
                notes.append(", ".join(_pass_note(e) for e in entry["graphs"].values()))
                if index == last_required and required_misses and not options.allow_unfused:
                    raise CheckFailed(
                        "; ".join(required_misses) + f". An unfused layer is slow on {target}: fix the graph, or "
                        "pass --allow-unfused to write it anyway"
                    )
                if step.name == QUANTIZE and reference is not None:
                    from dllm_trt.parity.reference import quantize_as_stored

                    # Later passes are judged against transformers with the same weights the graph now stores.
                    quantize_as_stored(reference, precision)
                if step.name == CONVERT:
                    dtype = PRECISION_DTYPES[precision]
                if reference is not None and (parity == "each" or index == len(active) - 1):
                    scratch.mkdir(exist_ok=True)
                    described = _save(graphs, source, scratch, files)
                    write_manifest(scratch, _stage_manifest(manifest, target, precision, described, source_hash, dtype))
                    entry["parity"] = _measure(reference, scratch, seed, dtype)
                    notes.append(_parity_note(entry["parity"]))
                entries.append(entry)
        shutil.rmtree(scratch, ignore_errors=True)
        with progress.stage("writing graphs, manifest.json, fusion_report") as notes:
            described = _save(graphs, source, tmp, files)
            for name in CARRIED_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            result = _stage_manifest(manifest, target, precision, described, source_hash, dtype)
            result["passes"] = [
                dict(name=e["name"], matched={g: v["matched"] for g, v in e["graphs"].items()},
                     parity=_parity_summary(e.get("parity")))
                for e in entries
            ]  # fmt: skip
            result["fusions"] = _fusion_summary(entries)
            result["timings_s"] = progress.timings
            write_manifest(tmp, result)
            write_fusion_report(tmp / FUSION_REPORT, result, entries)
            notes.append(f"{sum(d['nodes'] for d in described.values())} nodes")
    failed = [
        p["name"] for p in result["passes"]
        if p["parity"] and p["parity"].get("judged") and p["parity"].get("passed") is False
    ]  # fmt: skip
    return OptimizeResult(out, result, failed, unfused)


def _save(graphs: dict[str, ir.Model], source: Path, directory: Path, files: dict[str, str]) -> dict[str, dict]:
    """The graphs, and beside a step still in logits form (no sampling head) the export's
    self-conditioning graph, which the runtime then needs; all described for the manifest.

    The export's self-conditioning graph reads the embedding from the step's external data, which
    this directory's step replaces: it is saved with a data file of its own."""
    described = save_graphs(graphs, directory, files)
    if SAMPLING_OUTPUTS[0] not in {o["name"] for o in described[STEP]["outputs"]}:
        path = directory / SELF_CONDITIONING_FILE
        ir.save(ir.load(source / SELF_CONDITIONING_FILE), path, external_data=f"{SELF_CONDITIONING_FILE}.data")
        described["self_conditioning"] = describe_graph(path, external_data_entries(check_external_data(path)))
    return described


def _pass_note(graph_entry: dict) -> str:
    fusion = graph_entry.get("fusion")
    if fusion is None:
        return f"{graph_entry['matched']} matched"
    missed = f", {len(fusion['misses'])} layer(s) missed" if fusion["misses"] else ""
    return f"{fusion['fused']} of the model's {fusion['expected']} {fusion['op']} fused{missed}"


def _fusion_summary(entries: list[dict]) -> dict:
    """{op: {expected, fused, misses}} over the fusing passes, for the manifest."""
    return {
        graph["fusion"]["op"]: {key: graph["fusion"][key] for key in ("expected", "fused", "misses")}
        for entry in entries
        for graph in entry["graphs"].values()
        if "fusion" in graph
    }


def _parity_summary(parity: dict | None) -> dict | None:
    if parity is None:
        return None
    if not parity["measured"]:
        return dict(measured=False, reason=parity["reason"])
    worst = max(parity["result"]["comparisons"], key=lambda c: c["max_rel"])
    return dict(measured=True, judged=parity["judged"], passed=parity["passed"], failed=parity["failed"],
                worst=worst["name"], worst_max_rel=worst["max_rel"])  # fmt: skip


def _parity_note(parity: dict) -> str:
    if not parity["measured"]:
        return f"parity not measured: {parity['reason']}"
    summary = _parity_summary(parity)
    if parity["passed"]:
        verdict = "parity ok" if parity["judged"] else "parity within the informative bound"
    elif parity["judged"]:
        verdict = f"PARITY FAILED ({', '.join(parity['failed'])})"
    else:
        verdict = f"reduced-precision drift beyond the informative bound ({', '.join(parity['failed'])})"
    return f"{verdict}, worst max rel {summary['worst_max_rel']:.2e}"
