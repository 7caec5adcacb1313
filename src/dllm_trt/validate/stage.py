"""`dllm-trt validate`: `run(ValidateOptions) -> ValidateResult`; artifacts against the reference checkpoint,
on random inputs and real generations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_trt.errors import DllmError
from dllm_trt.manifest import read_manifest
from dllm_trt.models.checkpoint import checkpoint_hash, load_model, safetensors_files
from dllm_trt.progress import Progress
from dllm_trt.runtime.backends import open_step
from dllm_trt.runtime.loop import GenerationSettings, left_pad
from dllm_trt.runtime.step import TorchStep
from dllm_trt.validate.export_parity import step_parity
from dllm_trt.validate.generation_parity import generation_parity
from dllm_trt.validate.report import markdown, report_dict, write_report


def default_max_new_tokens(canvas: int, window: int) -> int:
    """Enough canvases that the context passes the sliding window, at most three."""
    return canvas * min(3, max(2, math.ceil((window + canvas) / canvas)))


def default_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Two prompts of different lengths (the second left-padded), ids drawn past the special tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (7, 3)]


@dataclass(frozen=True)
class ValidateOptions:
    artifacts: Path
    reference: Path  # the checkpoint the artifacts came from
    backend: str = "onnxruntime"  # the backend under test
    seeds: tuple[int, ...] = (0, 1)
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # () : two random prompts of different lengths
    max_new_tokens: int | None = None  # None: enough canvases to pass the sliding window
    report_dir: Path | None = None  # where report.json and report.md go; None: not written
    quiet: bool = False


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
    progress = Progress(total=5, quiet=options.quiet)
    with progress.stage("checking artifacts against the reference checkpoint") as notes:
        manifest = read_manifest(artifacts)
        digest = checkpoint_hash(reference, safetensors_files(reference))
        if manifest["checkpoint"]["hash"] != digest:
            raise DllmError(
                f"{artifacts} was made from checkpoint {manifest['checkpoint']['hash'][:19]}…, but --reference "
                f"{reference} is {digest[:19]}…; validate against the checkpoint it was exported from"
            )
        notes.append(f"checkpoint {digest[:19]}…")
    # The reference is transformers in fp32 (a bf16 checkpoint upcast exactly). A reduced-precision
    # artifact is judged against the envelope: transformers itself in the artifact's dtype.
    dtype = manifest["model"]["dtype"]
    with progress.stage("loading the reference (transformers) and the candidate") as notes:
        model = load_model(reference, dtype=torch.float32)
        envelope = None if dtype == "float32" else TorchStep(load_model(reference, dtype=getattr(torch, dtype)))
        candidate = open_step(artifacts, backend, checkpoint=reference)
        notes.append(f"{backend} ({getattr(candidate, 'execution', 'native')}), {dtype}" +
                     (f", envelope: transformers in {dtype}" if envelope else ""))  # fmt: skip
    text = model.config.text_config
    with progress.stage("random-input step parity") as notes:
        step = step_parity(model, candidate, seed=seeds[0], tolerance_dtype=dtype, envelope=envelope)
        notes.append(f"{sum(c.passed for c in step.comparisons)}/{len(step.comparisons)} within tolerance")
    settings = GenerationSettings.from_generation_config(
        model.generation_config.to_dict(),
        max_new_tokens=max_new_tokens or default_max_new_tokens(model.config.canvas_length, text.sliding_window),
    )
    ids, mask = left_pad(prompts or default_prompts(text.vocab_size, seeds[0]), text.pad_token_id or 0)
    with progress.stage(f"generation parity ({len(seeds)} seed(s), {settings.max_new_tokens} new tokens)") as notes:
        generation = generation_parity(
            model, TorchStep(model), candidate, settings, ids, mask, list(seeds), dtype, envelope
        )
        notes.append(f"{len(generation.steps)} calls replayed, {generation.judged} judged, "
                     f"{len(generation.failures())} failure(s)")  # fmt: skip
    report = report_dict(artifacts, backend, getattr(candidate, "execution", "native"), step, generation)
    with progress.stage("writing report") as notes:
        if report_dir is not None:
            write_report(report_dir, report)
            notes.append(f"{report_dir}/report.md")
    return ValidateResult(report["passed"], report["failures"], report, markdown(report))
