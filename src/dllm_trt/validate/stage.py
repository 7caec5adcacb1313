"""`dllm-trt validate`: `run(ValidateOptions) -> ValidateResult`; artifacts against the reference checkpoint,
on random inputs and real generations, or with `per_layer` layer by layer in bounded memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_trt.contract import GOLDEN_DIR, QUANTIZED_PRECISIONS, STEP_FILE
from dllm_trt.errors import DllmError
from dllm_trt.generation.backends import open_step
from dllm_trt.generation.cpu_variant import execution_on_cpu
from dllm_trt.generation.loop import GenerationSettings, left_pad
from dllm_trt.generation.step import TorchStep
from dllm_trt.manifest import atomic_output, read_manifest
from dllm_trt.models.checkpoint import checkpoint_hash, load_model, safetensors_files
from dllm_trt.parity.generation_parity import generation_parity
from dllm_trt.parity.per_layer import PerLayerOptions, per_layer_parity
from dllm_trt.parity.per_layer_report import PLOT, per_layer_markdown, plot_per_layer
from dllm_trt.parity.prompts import default_max_new_tokens, default_prompts
from dllm_trt.parity.reference import quantize_as_stored
from dllm_trt.parity.step_parity import step_parity
from dllm_trt.progress import Progress
from dllm_trt.validate.report import markdown, report_dict, write_report


@dataclass(frozen=True)
class ValidateOptions:
    artifacts: Path
    reference: Path  # the checkpoint the artifacts came from
    backend: str = "onnxruntime"  # the backend under test
    seeds: tuple[int, ...] = (0, 1)
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # () : two random prompts of different lengths
    max_new_tokens: int | None = None  # None: enough canvases to pass the sliding window
    report_dir: Path | None = None  # where report.json and report.md go; None: not written
    per_layer: bool = False  # only every layer against transformers' same layer, in bounded memory (per_layer.py)
    # A reduced-precision graph (bf16, fp16, fp8, nvfp4) has each layer judged as well as whole generations.
    layer_check: bool = True
    canvas: int | None = None  # --per-layer: tokens of the denoise calls' canvas; None: the model's canvas
    quiet: bool = False
    golden: bool = True  # with report_dir: golden/ beside the report, for stock `polygraphy run` (parity.golden)


@dataclass(frozen=True)
class ValidateResult:
    passed: bool
    failures: list[str]
    report: dict  # what report.json holds
    markdown: str  # what report.md holds


def run(options: ValidateOptions) -> ValidateResult:
    artifacts, reference, backend, seeds = options.artifacts, options.reference, options.backend, options.seeds
    max_new_tokens, report_dir = options.max_new_tokens, options.report_dir
    prompts = [list(p) for p in options.prompt_ids] or None
    if not seeds:
        raise DllmError("--seeds is empty; pass comma-separated integers like 0,1")
    if max_new_tokens is not None and max_new_tokens <= 0:
        raise DllmError("--max-new-tokens must be a positive integer")
    if options.canvas is not None and options.canvas <= 0:
        raise DllmError("--canvas must be a positive integer")
    manifest = read_manifest(artifacts)
    layers = len(manifest.get("model", {}).get("layers", []))
    vision = manifest.get("model", {}).get("vision")
    tower = vision["num_layers"] + 1 if vision and options.per_layer else 0  # its layers and its reference
    # Whole generations judge the typical error, which one layer's 5% norm error or a 2x error confined to one
    # expert hardly moves (measured: such bf16 and nvfp4 copies pass them), so every reduced-precision graph
    # has each layer judged on its own as well.
    reduced = manifest["model"]["dtype"] != "float32"
    layered = reduced and backend == "onnxruntime" and options.layer_check and (artifacts / STEP_FILE).is_file()
    total = layers + 4 + tower if options.per_layer else 5 + (layers + 1) * layered
    progress = Progress(total=total + _writes_golden(options), quiet=options.quiet)
    with progress.stage("checking artifacts against the reference checkpoint") as notes:
        digest = checkpoint_hash(reference, safetensors_files(reference))
        if manifest["checkpoint"]["hash"] != digest:
            raise DllmError(
                f"{artifacts} was made from checkpoint {manifest['checkpoint']['hash'][:19]}…, but --reference "
                f"{reference} is {digest[:19]}…; validate against the checkpoint it was exported from"
            )
        notes.append(f"checkpoint {digest[:19]}…")
    if options.per_layer:
        return _per_layer(options, manifest, prompts, progress)
    # The reference is transformers in fp32 (a bf16 checkpoint upcast exactly). A reduced-precision
    # artifact is judged against the envelope: transformers itself in the artifact's dtype.
    dtype = manifest["model"]["dtype"]
    with progress.stage("loading the reference (transformers) and the candidate") as notes:
        model = load_model(reference, dtype=torch.float32)
        envelope = None
        if dtype != "float32":
            low = load_model(reference, dtype=torch.float32)
            quantize_as_stored(low, manifest.get("precision", ""))
            envelope = TorchStep(low.to(getattr(torch, dtype)), images=vision is not None)
        candidate = open_step(artifacts, backend, checkpoint=reference)
        notes.append(f"{backend} ({getattr(candidate, 'execution', 'native')}), {dtype}" +
                     (f", envelope: transformers in {dtype}" if envelope else "") +
                     (f", its weights quantized as {manifest['precision']} stores them"
                      if manifest.get("precision") in QUANTIZED_PRECISIONS else ""))  # fmt: skip
    text = model.config.text_config
    title = "random-input step parity" + (", the vision graphs on fixed images" if vision else "")
    with progress.stage(title) as notes:
        step = step_parity(model, candidate, seed=seeds[0], tolerance_dtype=dtype, envelope=envelope)
        if vision is not None:
            step.comparisons += _vision_parity(model, candidate, artifacts, dtype)
        notes.append(f"{sum(c.passed for c in step.comparisons)}/{len(step.comparisons)} within tolerance")
    settings = GenerationSettings.from_generation_config(
        model.generation_config.to_dict(),
        max_new_tokens=max_new_tokens or default_max_new_tokens(model.config.canvas_length, text.sliding_window),
    )
    images = None
    if vision is not None:  # the prompts with images at their heads: the fixed test images, at the fewest soft tokens
        prompts, images = _with_images(prompts or default_prompts(text.vocab_size, seeds[0]), vision, artifacts)
    ids, mask = left_pad(prompts or default_prompts(text.vocab_size, seeds[0]), text.pad_token_id or 0)
    pictured = f", {len(images.counts)} images in the first prompt" if images else ""
    with progress.stage(
        f"generation parity ({len(seeds)} seed(s), {settings.max_new_tokens} new tokens{pictured})"
    ) as notes:
        generation = generation_parity(
            model, TorchStep(model, images=vision is not None), candidate, settings, ids, mask, list(seeds), dtype,
            envelope, images,
        )  # fmt: skip
        notes.append(f"{len(generation.steps)} calls replayed, {generation.judged} judged, "
                     f"{len(generation.failures())} failure(s)")  # fmt: skip
    report = report_dict(artifacts, backend, getattr(candidate, "execution", "native"), step, generation)
    text_md = markdown(report)
    if layered:
        del model, envelope, candidate
        result = per_layer_parity(PerLayerOptions(artifacts, reference, prompts or default_prompts(
            text.vocab_size, seeds[0]), seeds[0]), progress)  # fmt: skip
        report = dict(report, per_layer=result.to_dict()) | dict(
            passed=report["passed"] and result.passed, failures=report["failures"] + result.failures()
        )
        text_md += "\n" + per_layer_markdown(dict(report, execution=report["execution"]))
    with progress.stage("writing report") as notes:
        if report_dir is not None:
            write_report(report_dir, report)
            if "per_layer" in report:
                plot_per_layer(report, report_dir / PLOT)
                (report_dir / "report.md").write_text(text_md)
            notes.append(f"{report_dir}/report.md")
    _golden(options, prompts or default_prompts(text.vocab_size, seeds[0]), progress)
    return ValidateResult(report["passed"], report["failures"], report, text_md)


def _with_images(prompts: list[list[int]], vision: dict, artifacts: Path):  # noqa: ANN202
    """The first prompt with two fixed test images of different aspect ratios (one before its text, one
    inside it), the others as they are, placeholders expanded as the processor does; and the processed
    images (at the fewest soft tokens exported: the prompt pass grows with them)."""
    from dllm_trt.generation.image_inputs import expand_prompt_ids, image_processor, process_images
    from dllm_trt.parity.vision_parity import fixed_images

    image = vision["image_token_id"]
    count = min(int(n) for n in vision["graphs"])
    marked = [[image, *prompt[:2], image, *prompt[2:]] if row == 0 else list(prompt)
              for row, prompt in enumerate(prompts)]  # fmt: skip
    pictures = fixed_images(sum(p.count(image) for p in marked))
    processed = process_images(pictures, image_processor(artifacts, vision["patch_size"],
                                                         vision["pooling_kernel_size"], count))  # fmt: skip
    expanded = expand_prompt_ids(marked, iter(processed.counts), vision["boi_token_id"], image, vision["eoi_token_id"])
    return expanded, processed


def _vision_parity(model, candidate, artifacts: Path, dtype: str) -> list:  # noqa: ANN001
    """The candidate's vision graphs on the fixed images against transformers' tower: judged in fp32 (1e-4),
    reported in reduced precision as the rest of step parity is (--per-layer judges the tower against its
    envelope, layer by layer)."""
    from dllm_trt.parity.vision_parity import artifact_vision_parity

    return artifact_vision_parity(model, candidate, artifacts, dtype)


def _per_layer(options: ValidateOptions, manifest: dict, prompts: list[list[int]] | None, progress: Progress):
    """`--per-layer`: the artifact's step graph piece by piece against transformers layer by layer."""
    if options.backend != "onnxruntime":
        raise DllmError("--per-layer runs ONNX graphs piece by piece in onnxruntime; drop --backend")
    if not (options.artifacts / STEP_FILE).is_file():
        raise DllmError(
            f"{options.artifacts} has no {STEP_FILE}: --per-layer compares the graphs of 'dllm-trt export' or "
            "'optimize' (an engine's layers are compared on its GPU)"
        )
    vocab = manifest["model"]["vocab_size"]
    prompts = prompts or default_prompts(vocab, options.seeds[0])
    result = per_layer_parity(
        PerLayerOptions(options.artifacts, options.reference, prompts, options.seeds[0], options.canvas), progress
    )
    if manifest["model"].get("vision"):  # the tower's layers first: its soft tokens enter the step's prompt pass
        from dllm_trt.parity.vision_per_layer import tower_per_layer

        result.layers = tower_per_layer(options.artifacts, options.reference, manifest, progress) + result.layers
    execution = "onnxruntime, one layer at a time; " + execution_on_cpu(options.artifacts)
    report = dict(
        artifacts=str(options.artifacts), backend="onnxruntime", execution=execution, mode="per-layer",
        passed=result.passed, failures=result.failures(), per_layer=result.to_dict(),
    )  # fmt: skip
    with progress.stage("writing report") as notes:
        if options.report_dir is not None:
            options.report_dir.mkdir(parents=True, exist_ok=True)
            plot_per_layer(report, options.report_dir / PLOT)
            (options.report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (options.report_dir / "report.md").write_text(per_layer_markdown(report))
            notes.append(f"{options.report_dir}/report.md, {PLOT}")
    _golden(options, prompts, progress)
    return ValidateResult(report["passed"], report["failures"], report, per_layer_markdown(report))


def _writes_golden(options: ValidateOptions) -> bool:
    """Golden files are made beside a report, for graphs (an engine carries the ones its graph got: build --golden)."""
    return options.golden and options.report_dir is not None and (options.artifacts / STEP_FILE).is_file()


def _golden(options: ValidateOptions, prompts: list[list[int]], progress: Progress) -> None:
    """REPORT/golden/: the calls' inputs and transformers' outputs for stock `polygraphy run` (parity.golden)."""
    if not _writes_golden(options):
        return
    from dllm_trt.parity.golden import GoldenOptions, write_golden

    with progress.stage("golden files for polygraphy run") as notes:
        golden = GoldenOptions(options.artifacts, options.reference, prompts, options.seeds[0], options.canvas)
        with atomic_output(options.report_dir / GOLDEN_DIR, force=True) as tmp:
            info = write_golden(golden, tmp)
        notes.append(f"{options.report_dir / GOLDEN_DIR}/README.md: {', '.join(info['commands'])}")
