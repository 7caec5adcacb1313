"""`dllm-trt export`: checkpoint directory -> step.onnx (the encoder pass and the denoise step in one
graph, one copy of every weight), self_conditioning.onnx (sharing the step's embedding) and manifest.json.

`run(ExportOptions) -> ExportResult`. Streaming, so that peak memory does not grow with the
checkpoint: the graphs are traced over a model without weights (`models/skeleton.py`, `lazy_graph.py`),
then every weight is read from the safetensors shards and written to external-data shards one
chunk at a time, transposed and cast as the graph expects (`weights.py`, `writer.py`). Finished
shards are journaled, so an interrupted export resumes (`journal.py`). The parity check holds one
layer of the reference (`models/offloaded.py`) and, above PER_LAYER_PARITY_ABOVE, one layer of the
graph. `onnx_export.export_step` and friends remain the in-memory path; both paths produce the same
nodes and byte-identical weights.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import onnx_ir as ir
import torch

from dllm_trt.contract import (
    CARRIED_FILES,
    DEFAULT_MAX_SOFT_TOKENS,
    SELF_CONDITIONING_FILE,
    STAGE_EXPORT,
    STEP,
    STEP_FILE,
    vision_graph,
)
from dllm_trt.errors import DllmError
from dllm_trt.export.journal import Journal, resumable_output
from dllm_trt.export.lazy_graph import lazy_graph
from dllm_trt.export.onnx_export import OPSET, check_experts, self_conditioning_spec, step_spec, vision_spec
from dllm_trt.export.weights import FOLD_INPUT_LIMIT, CheckpointWeight
from dllm_trt.export.writer import DEFAULT_SHARD_BYTES, WrittenFile, plan_shards, write_shards
from dllm_trt.manifest import MANIFEST, check_external_data, describe_graph, tool_versions, write_manifest
from dllm_trt.models.checkpoint import checkpoint_hash, read_config, safetensors_files, tensor_index
from dllm_trt.models.diffusion_gemma import fusible_ops, layer_specs
from dllm_trt.models.skeleton import build_skeleton, checkpoint_dtype, parse_dtype
from dllm_trt.models.vision import SUPPORTED_SOFT_TOKENS, VisionFacts, has_vision_tower
from dllm_trt.parity.compare import summary_lines
from dllm_trt.progress import Progress, human_bytes

GRAPHS = (
    (STEP, STEP_FILE, step_spec),
    ("self_conditioning", SELF_CONDITIONING_FILE, self_conditioning_spec),
)


def graphs_for(tower: bool, max_soft_tokens: tuple[int, ...]) -> list[tuple]:
    """(name, file, spec factory) of every graph: the step (with image inputs where there is a tower), the
    self-conditioning graph, and one vision graph per max_soft_tokens over one copy of the tower's weights."""
    if not tower:
        return list(GRAPHS)
    graphs = [(STEP, STEP_FILE, lambda model: step_spec(model, images=True)), GRAPHS[1]]
    for count in max_soft_tokens:
        name = vision_graph(count)
        graphs.append((name, f"{name}.onnx", lambda model, n=count: vision_spec(model, n)))
    return graphs


# Above this many bytes of checkpoint weights parity is measured layer by layer (parity.per_layer): the
# whole-graph check holds every weight in one onnxruntime session (16 GB for 2 full-width layers in fp32).
# bfloat16 exports are always checked per layer: only a piece at a time can run bf16 emulated on this CPU.
PER_LAYER_PARITY_ABOVE = 1 << 30


def model_summary(model, max_soft_tokens: tuple[int, ...] = ()) -> dict:  # noqa: ANN001
    """The manifest's model facts; with `max_soft_tokens`, the vision tower's and its graph per count."""
    text = model.config.text_config
    vision = None
    if max_soft_tokens:
        facts = VisionFacts.from_config(model.config.to_dict())
        vision = dict(facts.to_dict(), graphs={str(n): vision_graph(n) for n in max_soft_tokens},
                      config=model.config.vision_config.to_dict())  # fmt: skip
    return dict(
        model_type=model.config.model_type,
        dtype=str(model.dtype).removeprefix("torch."),
        canvas_length=model.config.canvas_length,
        sliding_window=text.sliding_window,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_experts=text.num_experts,
        top_k_experts=text.top_k_experts,
        layers=[asdict(spec) for spec in layer_specs(model)],
        fusible_ops=fusible_ops(model),
        pad_token_id=text.pad_token_id,
        text_config=text.to_dict(),
        vision=vision,  # None: a text-only checkpoint (no vision graph, no image inputs on the step)
    )


def describe_exported_graph(path: Path, written: list[WrittenFile]) -> dict:
    """The manifest entry of one graph; external-data checksums come from the writer (no second read)."""
    return describe_graph(path, [dict(file=w.file, bytes=w.bytes, sha256=w.sha256) for w in written])


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    output: Path
    parity: bool = True  # measure onnxruntime against transformers after writing
    seed: int = 0  # of the parity check's random inputs
    force: bool = False  # replace a non-empty output directory
    # float32 | float16 | bfloat16: cast the weights as `from_pretrained(dtype=...)` does; None keeps the
    # checkpoint's. Parity of a bfloat16 export is measured per layer, against the bf16 envelope.
    dtype: str | None = None
    per_layer_parity_above: int = PER_LAYER_PARITY_ABOVE  # checkpoint bytes; see PER_LAYER_PARITY_ABOVE
    quiet: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    eager_max_elements: int = FOLD_INPUT_LIMIT
    # One vision graph per count (where the checkpoint holds a vision tower), over one copy of its weights.
    max_soft_tokens: tuple[int, ...] = (DEFAULT_MAX_SOFT_TOKENS,)
    vision: bool | None = None  # None: export the tower where the checkpoint holds one; False: text only


@dataclass(frozen=True)
class ExportResult:
    output: Path
    manifest: dict
    parity_failed: str | None  # the worst failing comparison, None when parity passed or was not measured


def run(options: ExportOptions) -> ExportResult:
    """Export, check and (by default) measure parity; the manifest is written to `options.output`."""
    ckpt, out, dtype, quiet = options.checkpoint, options.output, options.dtype, options.quiet
    parity, seed, force = options.parity, options.seed, options.force
    max_shard_bytes, eager_max_elements = options.max_shard_bytes, options.eager_max_elements
    soft_counts = _soft_counts(options.max_soft_tokens)
    config = read_config(ckpt)
    files = safetensors_files(ckpt)
    index = tensor_index(files)
    tower = has_vision_tower(index) if options.vision is None else options.vision
    if tower and not has_vision_tower(index):
        raise DllmError(f"{ckpt} holds no vision tower weights (a text-only checkpoint): there is no tower to export")
    soft_counts = soft_counts if tower else ()
    graph_list = graphs_for(tower, soft_counts)
    progress = Progress(total=3 + len(graph_list) + parity, quiet=quiet)
    with progress.stage("checking checkpoint") as notes:
        source_dtype = checkpoint_dtype(config, index)
        export_dtype = parse_dtype(dtype) if dtype is not None else source_dtype
        paths = [ckpt / "config.json", *files]
        meter = progress.bytes(sum(p.stat().st_size for p in paths), "hashing")
        digest = checkpoint_hash(ckpt, files, meter.advance)
        meter.finish()
        cast = "" if export_dtype == source_dtype else f", exported as {_name(export_dtype)}"
        weight_bytes = sum(f.stat().st_size for f in files)
        notes.append(
            f"{len(files)} weight file(s), {human_bytes(weight_bytes)}, {_name(source_dtype)}{cast}, {digest[:19]}…"
        )
    per_layer = export_dtype == torch.bfloat16 or weight_bytes > options.per_layer_parity_above
    key = _journal_key(digest, export_dtype, max_shard_bytes, eager_max_elements, soft_counts)
    with resumable_output(out, force=force) as work:
        with progress.stage("building the model without weights") as notes:
            model = build_skeleton(ckpt, export_dtype)
            text = model.config.text_config
            notes.append(f"{text.num_hidden_layers} layers, {_name(export_dtype)}, nothing read but config.json")
        journal = Journal(work, key)
        graphs, on_disk = {}, {}
        for name, file, spec in graph_list:
            with progress.stage(f"exporting {file}") as notes:
                graphs[name] = _export_graph(
                    name, file, spec, model, index, work, journal, progress, max_shard_bytes, eager_max_elements,
                    on_disk,
                )  # fmt: skip
                external = graphs[name]["external_data"]
                size = graphs[name]["bytes"] + sum(e["bytes"] for e in external)
                resumed = graphs[name].pop("resumed")
                notes.append(
                    f"{graphs[name]['nodes']} nodes, {human_bytes(size)} in {len(external)} data file(s)"
                    + (f", {resumed} kept from an interrupted run" if resumed else "")
                )
        for carried in CARRIED_FILES:
            if (ckpt / carried).is_file():
                shutil.copy2(ckpt / carried, work / carried)
        manifest = dict(
            stage=STAGE_EXPORT,
            checkpoint=dict(
                path=str(ckpt.resolve()), hash=digest, files=[f.name for f in files], dtype=_name(source_dtype)
            ),
            model=model_summary(model, soft_counts),
            opset=OPSET,
            tools=tool_versions(),
            graphs=graphs,
        )
        result = None
        if parity and per_layer:
            with progress.stage("measuring parity: onnxruntime vs transformers, layer by layer") as notes:
                write_manifest(work, manifest)  # the per-layer check reads the artifacts as validate does
                result, lines = _measure_parity_per_layer(ckpt, work, seed, text.vocab_size)
                manifest["parity"] = result
                first = result["first_divergent_layer"]
                notes.append("every layer within its bound" if first is None else f"first divergent layer {first}")
            for line in lines:
                progress.note(line)
        elif parity:
            with progress.stage("measuring parity: onnxruntime vs transformers") as notes:
                result, lines = _measure_parity(ckpt, work, model, export_dtype, source_dtype, index, seed, soft_counts)
                manifest["parity"] = result
                passed = sum(c["passed"] for c in result["comparisons"])
                notes.append(f"{passed}/{len(result['comparisons'])} within tolerance")
            for line in ([result["note"]] if result.get("note") else []) + lines:
                progress.note(line)
        manifest["timings_s"] = progress.timings
        with progress.stage(f"writing {MANIFEST}"):
            write_manifest(work, manifest)
        _remove_strays(work, manifest)
    failed = None
    if result is not None and not result["passed"]:
        if result.get("mode") == "per-layer":
            failed = result["failures"][0]
        else:
            failed = max((c for c in result["comparisons"] if not c["passed"]), key=lambda c: c["max_rel"])["name"]
    return ExportResult(out, manifest, failed)


def _export_graph(
    name: str,
    file: str,
    spec,  # noqa: ANN001 (a TraceSpec factory)
    model,  # noqa: ANN001
    index: dict,
    work: Path,
    journal: Journal,
    progress: Progress,
    max_shard_bytes: int,
    eager_max_elements: int,
    on_disk: dict[str, tuple[ir.ExternalTensor, WrittenFile]],
) -> dict:
    """Trace one graph without weights, write its weights (resumably), save and check it; its manifest entry.

    One graph at a time, traced then written, so that an interruption loses at most one trace.
    `on_disk` (checkpoint recipe -> where an earlier graph wrote it) makes a weight two graphs share
    (the embedding of the step and of the self-conditioning graph) one copy on disk.
    """
    graph = lazy_graph(spec(model), model, index, eager_max_elements)
    shared: list[WrittenFile] = []
    recipes = {}
    for value in graph.graph.initializers.values():
        if isinstance(value.const_value, CheckpointWeight):
            key = value.const_value.recipe.describe()
            if key in on_disk:
                value.const_value, written_file = on_disk[key]
                shared.append(written_file)
            else:
                recipes[value.name] = key
    shards = plan_shards(graph.graph, Path(file).stem, max_shard_bytes)
    written = write_shards(graph.graph, name, shards, work, journal, progress)
    by_file = {w.file: w for w in written}
    for value_name, key in recipes.items():
        tensor = graph.graph.initializers[value_name].const_value
        if isinstance(tensor, ir.ExternalTensor):
            on_disk[key] = (tensor, by_file[tensor.location])
    ir.save(graph, str(work / file))  # tensors are external already: only the graph is written
    files = {w.file: w for w in [*written, *shared]}
    external = check_external_data(work / file)
    if sorted(p.name for p in external) != sorted(files):
        raise RuntimeError(f"{file} refers to {external}, the writer wrote {sorted(files)}")
    if name == STEP:
        text = model.config.text_config
        hidden, width, experts = text.hidden_size, text.moe_intermediate_size, text.num_experts
        check_experts(work / file, experts, (experts, 2 * width, hidden), (experts, hidden, width),
                      text.num_hidden_layers)  # fmt: skip
    return describe_exported_graph(work / file, list(files.values())) | dict(resumed=sum(w.resumed for w in written))


def _measure_parity(
    ckpt: Path,
    work: Path,
    skeleton,  # noqa: ANN001
    export_dtype: torch.dtype,
    source_dtype: torch.dtype,
    index: dict,
    seed: int,
    soft_counts: tuple[int, ...] = (),
) -> tuple[dict, list[str]]:
    """Parity of the graphs in `work` against transformers in `export_dtype`, one layer and one session at a
    time; with `soft_counts`, the vision graphs too, on fixed images, and the step's prompt pass with images."""
    from dllm_trt.generation.step import OnnxRuntimeStep, StepInfo
    from dllm_trt.models.offloaded import offloaded_reference
    from dllm_trt.parity.step_parity import step_parity
    from dllm_trt.parity.vision_parity import vision_parity

    reference = offloaded_reference(ckpt, export_dtype, index)
    step = OnnxRuntimeStep(work, layer_specs(skeleton), StepInfo.from_model(reference), resident=False)
    result = step_parity(reference, step, seed=seed)
    if soft_counts:
        facts = VisionFacts.from_config(reference.config.to_dict())
        step.vision = {n: f"{vision_graph(n)}.onnx" for n in soft_counts}
        step.pooling_kernel = facts.pooling_kernel_size
        result.comparisons += vision_parity(reference, step, ckpt, facts, list(soft_counts))
    out = result.to_dict()
    if export_dtype != source_dtype:
        out["checkpoint_dtype"] = _name(source_dtype)
        out["note"] = (
            f"parity of a {_name(export_dtype)} copy of a {_name(source_dtype)} checkpoint: it proves the graphs, "
            f"not {_name(source_dtype)} numerics (onnxruntime CPU does not compute in {_name(source_dtype)})"
        )
    return out, summary_lines(result.comparisons)


def _measure_parity_per_layer(ckpt: Path, work: Path, seed: int, vocab: int) -> tuple[dict, list[str]]:
    """Every layer of the graphs in `work` against transformers' same layer (validate --per-layer's check)."""
    from dllm_trt.manifest import read_manifest
    from dllm_trt.parity.per_layer import PerLayerOptions, per_layer_parity
    from dllm_trt.parity.prompts import default_prompts
    from dllm_trt.parity.vision_per_layer import tower_per_layer

    result = per_layer_parity(PerLayerOptions(work, ckpt, default_prompts(vocab, seed), seed))
    manifest = read_manifest(work)
    if manifest["model"].get("vision"):  # the tower layer by layer too, on the fixed images
        result.layers = tower_per_layer(work, ckpt, manifest) + result.layers
    lines = result.failures() or [
        f"every layer within its bound ({result.judged_tokens}/{result.tokens} token-layers judged, calls: "
        f"{', '.join(result.calls)})"
    ]
    return dict(mode="per-layer", **result.to_dict()), lines


def _journal_key(
    digest: str, dtype: torch.dtype, max_shard_bytes: int, eager_max_elements: int, soft_counts: tuple[int, ...] = ()
) -> str:
    """What finished files depend on besides their own plan: the checkpoint's bytes and the tools that traced it."""
    versions = {name: _version(name) for name in ("dllm-trt", "torch", "onnxscript", "onnx-ir")}
    text = f"{digest}|{dtype}|{max_shard_bytes}|{eager_max_elements}|{sorted(versions.items())}"
    if soft_counts:  # a text-only export keeps the key it always had
        text += f"|vision {list(soft_counts)}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _soft_counts(values: tuple[int, ...]) -> tuple[int, ...]:
    """The vision graphs' max_soft_tokens, checked, each once, in the order given."""
    counts = tuple(dict.fromkeys(int(v) for v in values))
    bad = [v for v in counts if v not in SUPPORTED_SOFT_TOKENS]
    if bad or not counts:
        raise DllmError(
            f"--max-soft-tokens {bad[0] if bad else 'is empty'}: Gemma 4's image processor takes one of "
            f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}"
        )
    return counts


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def _remove_strays(work: Path, manifest: dict) -> None:
    """Files of an earlier plan (other shard names) or a killed write must not end up in the output."""
    keep = {MANIFEST, *CARRIED_FILES}
    for graph in manifest["graphs"].values():
        keep.add(graph["file"])
        keep.update(e["file"] for e in graph["external_data"])
    for path in work.iterdir():
        if path.name not in keep and path.name != "journal.json":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
