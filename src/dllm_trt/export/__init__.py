"""`dllm-trt export`: checkpoint directory -> encoder.onnx, denoiser.onnx, manifest.json."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from dllm_trt.export.onnx_export import (
    DENOISER_FILE,
    ENCODER_FILE,
    OPSET,
    SELF_CONDITIONING_FILE,
    check_experts,
    check_external_data,
    export_denoiser,
    export_encoder,
    export_self_conditioning,
)
from dllm_trt.manifest import atomic_output, describe_graph, tool_versions, write_manifest
from dllm_trt.models.checkpoint import checkpoint_hash, load_model, read_config, safetensors_files
from dllm_trt.models.diffusion_gemma import layer_specs
from dllm_trt.progress import Progress, human_bytes

# Files a runtime needs beside the graphs: how to generate, and how to tokenize when there is a tokenizer.
CARRIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def model_summary(model) -> dict:  # noqa: ANN001
    text = model.config.text_config
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
        pad_token_id=text.pad_token_id,
        text_config=text.to_dict(),
    )


def export_checkpoint(
    ckpt: Path, out: Path, parity: bool = True, seed: int = 0, force: bool = False, quiet: bool = False
) -> dict:
    """Export, check and (by default) measure parity; returns the manifest written to `out`."""
    progress = Progress(total=7 if parity else 6, quiet=quiet)
    with progress.stage("checking checkpoint") as notes:
        read_config(ckpt)
        files = safetensors_files(ckpt)
        digest = checkpoint_hash(ckpt, files)
        notes.append(
            f"{len(files)} weight file(s), {human_bytes(sum(f.stat().st_size for f in files))}, {digest[:19]}…"
        )
    with progress.stage("loading model through transformers") as notes:
        model = load_model(ckpt)
        notes.append(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.dtype}")
    text = model.config.text_config
    with atomic_output(out, force=force) as tmp:
        graphs = {}
        for name, file, export in (
            ("encoder", ENCODER_FILE, export_encoder),
            ("denoiser", DENOISER_FILE, export_denoiser),
        ):
            with progress.stage(f"exporting {file}") as notes:
                export(model, tmp / file)
                external = check_external_data(tmp / file)
                moe_layers = text.num_hidden_layers - (1 if name == "encoder" else 0)  # encoder: last FFN unused
                hidden, width, experts = text.hidden_size, text.moe_intermediate_size, text.num_experts
                check_experts(tmp / file, experts, (experts, 2 * width, hidden), (experts, hidden, width), moe_layers)
                graphs[name] = describe_graph(tmp / file, external)
                size = graphs[name]["bytes"] + sum(e["bytes"] for e in graphs[name]["external_data"])
                notes.append(
                    f"{graphs[name]['nodes']} nodes, {human_bytes(size)}, {experts} experts x {moe_layers} MoE layers"
                )
        with progress.stage(f"exporting {SELF_CONDITIONING_FILE}") as notes:
            export_self_conditioning(model, tmp / SELF_CONDITIONING_FILE)
            graphs["self_conditioning"] = describe_graph(
                tmp / SELF_CONDITIONING_FILE, check_external_data(tmp / SELF_CONDITIONING_FILE)
            )
        for name in CARRIED_FILES:
            if (ckpt / name).is_file():
                shutil.copy2(ckpt / name, tmp / name)
        manifest = dict(
            stage="export",
            checkpoint=dict(path=str(ckpt.resolve()), hash=digest, files=[f.name for f in files]),
            model=model_summary(model),
            opset=OPSET,
            tools=tool_versions(),
            graphs=graphs,
        )
        if parity:
            with progress.stage("measuring parity: onnxruntime vs transformers") as notes:
                from dllm_trt.runtime.step import OnnxRuntimeStep, StepInfo
                from dllm_trt.validate.export_parity import step_parity

                step = OnnxRuntimeStep(tmp, layer_specs(model), StepInfo.from_model(model))
                result = step_parity(model, step, seed=seed)
                manifest["parity"] = result.to_dict()
                failed = [c for c in result.comparisons if not c.passed]
                notes.append(f"{len(result.comparisons) - len(failed)}/{len(result.comparisons)} within tolerance")
            for comparison in result.comparisons:
                progress.note(comparison.line())
        manifest["timings_s"] = progress.timings
        with progress.stage("writing manifest.json"):
            write_manifest(tmp, manifest)
    if parity and not result.passed:
        worst = max((c for c in result.comparisons if not c.passed), key=lambda c: c.max_rel)
        manifest["parity_failed"] = worst.name
    return manifest
