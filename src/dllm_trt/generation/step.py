"""One Step interface over every backend: the encoder pass and the denoise step, plain tensors in and out.

Backends differ only in how they run the step graph (one graph for both, models.diffusion_gemma.Step:
zero rows of self-conditioning encode, a canvas's rows denoise); the block-diffusion loop never changes.
Letters: B batch, T new tokens, C canvas, H hidden, V vocab, P cached positions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dllm_trt.contract import (
    LOGITS,
    SAMPLING_INPUTS,
    SAMPLING_OUTPUTS,
    SELF_CONDITIONING_FILE,
    SOFT_EMBEDDING_INPUT,
    SOFT_EMBEDDING_OUTPUT,
    STEP_FILE,
    STEP_IMAGE_INPUTS,
    STEP_INPUTS,
    VISION_INPUTS,
    VISION_OUTPUT,
    cache_names,
)
from dllm_trt.errors import DllmError
from dllm_trt.generation.images import PassImages
from dllm_trt.generation.sampler import sampling_head
from dllm_trt.models.diffusion_gemma import LayerSpec, SoftEmbedding, layer_specs
from dllm_trt.models.diffusion_gemma import Step as StepGraph

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StepInfo:
    """What the loop needs to know about the model behind a Step."""

    canvas_length: int
    vocab_size: int
    hidden_size: int
    sliding_window: int
    dtype: torch.dtype
    device: str = "cpu"  # where the loop keeps its tensors and draws its random numbers
    prompt_chunk_max: int | None = None  # the most new tokens one encoder pass takes (an engine's profile)

    @classmethod
    def from_model(cls, model) -> StepInfo:  # noqa: ANN001
        text = model.config.text_config
        return cls(
            model.config.canvas_length, text.vocab_size, text.hidden_size, text.sliding_window, model.dtype,
            str(model.device),
        )  # fmt: skip

    @classmethod
    def from_manifest(cls, manifest: dict, device: str = "cpu") -> StepInfo:
        model = manifest["model"]
        return cls(
            model["canvas_length"], model["vocab_size"], model["hidden_size"], model["sliding_window"],
            _DTYPES[model["dtype"]], device,
        )  # fmt: skip


@dataclass
class DenoiseSample:
    """One denoise step as the sampler consumes it; all [B, C] but the next self-conditioning [B, C, H]."""

    sampled: torch.Tensor
    argmax: torch.Tensor
    entropy: torch.Tensor
    next_self_conditioning: torch.Tensor


class Step(Protocol):
    specs: list[LayerSpec]
    info: StepInfo

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        input_mask: torch.Tensor,
        cache_mask: torch.Tensor,
        past: list[torch.Tensor],
        images: PassImages | None = None,
    ) -> list[torch.Tensor]:
        """K/V of the T new tokens for every layer: key.0, value.0, ... each [B, G, T, D]; `images`: the
        pass's image soft tokens and where they go (a checkpoint with a vision tower)."""  # fmt: skip

    def image_features(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The vision tower: the image processor's pixels [I, P, 3*patch^2] and positions [I, P, 2] -> every
        image's valid soft tokens [sum(counts), H], images in order (counts: soft tokens per image)."""  # fmt: skip

    def denoise_and_sample(
        self,
        canvas_ids: torch.Tensor,
        self_conditioning: torch.Tensor,
        position_ids: torch.Tensor,
        cache_mask: torch.Tensor,
        past: list[torch.Tensor],
        temperature: torch.Tensor,
        noise: torch.Tensor,
    ) -> DenoiseSample:
        """One denoise step and what the sampler needs from it (see generation.sampler). `temperature` is
        0-d (every row) or [B] (one per row)."""  # fmt: skip


class LogitsStep:
    """A backend whose denoise step hands out the logits: the sampling head runs here, in torch."""

    specs: list[LayerSpec]
    info: StepInfo

    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past) -> torch.Tensor:  # noqa: ANN001
        raise NotImplementedError

    def soft_embedding(self, processed_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        logits = self.denoise(canvas_ids, self_conditioning, position_ids, cache_mask, past)
        temperature = torch.as_tensor(temperature)  # 0-d, or [B]: one per row (rows at different steps)
        processed = logits / (temperature[:, None, None] if temperature.dim() == 1 else temperature)  # [B, C, V]
        head = sampling_head(processed, noise)
        next_sc = self.soft_embedding(processed.to(self.info.dtype))
        return DenoiseSample(head.sampled, head.argmax, head.entropy, next_sc)


class TorchStep(LogitsStep):
    """The transformers modules themselves, with transformers' own experts implementation."""

    def __init__(self, model, dense_moe: bool = False, images: bool = False) -> None:  # noqa: ANN001
        self.specs = layer_specs(model)
        self.info = StepInfo.from_model(model)
        self.images = images  # the checkpoint has a vision tower: encode() takes images
        self.model = model
        self.step = StepGraph(model, dense_moe=dense_moe)
        self.soft = SoftEmbedding(model)

    def _cast(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Float inputs in the model's dtype (a caller may hand over another precision's cache)."""
        dtype = self.info.dtype
        return [t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in tensors]

    @torch.no_grad()
    def encode(self, input_ids, position_ids, input_mask, cache_mask, past, images=None):  # noqa: ANN001, ANN201
        no_rows = no_self_conditioning(input_ids, self.info)
        merged = None if images is None else (images.embeds.to(self.info.dtype), images.rows, images.block_ids)
        out = self.step.run(input_ids, position_ids, input_mask, cache_mask, no_rows, self._cast(past), merged)
        return list(out[:-1])

    @torch.no_grad()
    def image_features(self, pixel_values, position_ids, counts):  # noqa: ANN001, ANN201
        """transformers' own tower and embedder (get_image_features), which strip the padding themselves."""
        from dllm_trt.models.vision import reference_image_features

        return reference_image_features(self.model, pixel_values, position_ids)

    @torch.no_grad()
    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        self_conditioning, *past = self._cast([self_conditioning, *past])
        valid = torch.ones_like(canvas_ids, dtype=torch.bool)
        return self.step(canvas_ids, position_ids, valid, cache_mask, self_conditioning, *past)[-1]

    @torch.no_grad()
    def soft_embedding(self, processed_logits):  # noqa: ANN001, ANN201
        return self.soft(*self._cast([processed_logits]))


def no_self_conditioning(input_ids: torch.Tensor, info: StepInfo) -> torch.Tensor:
    """The self-conditioning input of an encoder pass: zero rows [B, 0, H] (what selects the phase)."""
    return torch.zeros(input_ids.shape[0], 0, info.hidden_size, dtype=info.dtype, device=input_ids.device)


def step_feeds(past_names: list[str], input_ids, position_ids, input_mask, cache_mask, self_conditioning, past) -> dict:  # noqa: ANN001
    """The step graph's inputs by name (contract.STEP_INPUTS, then the cache)."""
    values = (input_ids, position_ids, input_mask, cache_mask, self_conditioning)
    return dict(zip(STEP_INPUTS, values)) | dict(zip(past_names, past))


def image_feeds(step, images: PassImages | None) -> dict:  # noqa: ANN001
    """The image inputs of a step graph that has them (contract.STEP_IMAGE_INPUTS); none for one that has not.

    `images` None on a graph with image inputs: S = 0 (a text pass, a denoise step).
    """
    if not getattr(step, "images", False):
        if images is not None and images.rows.numel():
            raise DllmError("these graphs were exported from a text-only checkpoint: they take no images")
        return {}
    if images is None:
        images = PassImages.empty(step.info.hidden_size, step.info.dtype)
    values = (images.embeds.to(step.info.dtype), images.rows, images.block_ids)
    return dict(zip(STEP_IMAGE_INPUTS, values))


def encoder_feeds(step, input_ids, position_ids, input_mask, cache_mask, past, images=None) -> dict:  # noqa: ANN001
    """An encoder pass: the new tokens, zero rows of self-conditioning (and of sampling noise), its images."""
    feeds = step_feeds(step.past_names, input_ids, position_ids, input_mask, cache_mask,
                       no_self_conditioning(input_ids, step.info), past)  # fmt: skip
    feeds |= image_feeds(step, images)
    temperature, noise = SAMPLING_INPUTS
    feeds[temperature] = torch.ones(input_ids.shape[0], dtype=torch.float32)
    feeds[noise] = torch.zeros(input_ids.shape[0], 0, step.info.vocab_size, dtype=torch.float32)
    return feeds


def denoiser_feeds(step, canvas_ids, self_conditioning, position_ids, cache_mask, past) -> dict:  # noqa: ANN001
    """A denoise step: the canvas, every position valid, self-conditioning on every row, no image."""
    valid = torch.ones_like(canvas_ids, dtype=torch.bool)
    feeds = step_feeds(step.past_names, canvas_ids, position_ids, valid, cache_mask, self_conditioning, past)
    return feeds | image_feeds(step, None)


def has_image_inputs(graph: Path) -> bool:
    """Whether a step graph takes image inputs (exported from a checkpoint with a vision tower)."""
    import onnx

    names = {value.name for value in onnx.load(str(graph), load_external_data=False).graph.input}
    return STEP_IMAGE_INPUTS[0] in names


def vision_files(manifest: dict) -> dict[int, str]:
    """max_soft_tokens -> the vision graph's file, from an export's or optimize's manifest (empty: text only)."""
    vision = manifest["model"].get("vision") or {}
    return {int(n): manifest["graphs"][name]["file"] for n, name in vision.get("graphs", {}).items()}


def sampling_feeds(step, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise) -> dict:  # noqa: ANN001
    """A denoise step of a graph that samples inside: denoiser_feeds plus the temperature (0-d for every row,
    or [B]: the graph takes one per row) and the noise."""
    feeds = denoiser_feeds(step, canvas_ids, self_conditioning, position_ids, cache_mask, past)
    temperature_name, noise_name = SAMPLING_INPUTS
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=canvas_ids.device)
    feeds[temperature_name] = temperature.reshape(-1).expand(canvas_ids.shape[0]).contiguous()
    feeds[noise_name] = noise.view(canvas_ids.shape[0], canvas_ids.shape[1], -1)
    return feeds


class _OnnxRuntimeBase:
    """Sessions and the encoder step shared by both onnxruntime step kinds.

    `resident=False` opens each graph for one call and closes it after (export's parity check in
    bounded memory: a graph's weights are never resident while the reference holds a layer).
    """

    files: tuple[str, ...] = ()
    spin = False  # see ort_session.open_session: only a step that leaves torch idle between runs spins

    def __init__(
        self, artifacts: Path, specs: list[LayerSpec], info: StepInfo, device: str = "cpu", threads: int = 0,
        resident: bool = True,
    ) -> None:  # fmt: skip
        from dllm_trt.generation.ort_session import open_session

        self.artifacts, self.specs, self.info, self.device, self.threads = artifacts, specs, info, device, threads
        self.execution = "native"
        self.images = has_image_inputs(artifacts / STEP_FILE)
        self.vision: dict[int, str] = {}  # max_soft_tokens -> vision graph file, set by from_artifacts
        self.pooling_kernel = 1
        self.sessions = {}
        if resident:
            self.sessions = {
                f: open_session(artifacts / f, device, threads=threads, spin=self.spin) for f in self.files
            }
        self.past_names = cache_names(specs, "past_")
        self.new_names = cache_names(specs, "")

    def _run(self, file: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from dllm_trt.generation.ort_session import open_session, run

        session = self.sessions.get(file) or open_session(self.artifacts / file, self.device, threads=self.threads)
        return run(session, feeds)

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past, images=None):  # noqa: ANN001, ANN201
        feeds = encoder_feeds(self, input_ids, position_ids, input_mask, cache_mask, past, images)
        return [self._run(STEP_FILE, feeds)[name] for name in self.new_names]

    def image_features(self, pixel_values, position_ids, counts):  # noqa: ANN001, ANN201
        """The vision graph for the processor's patch count, each image's valid prefix of its soft tokens."""
        from dllm_trt.models.vision import valid_rows

        soft_tokens = pixel_values.shape[1] // self.pooling_kernel**2
        file = self.vision.get(soft_tokens)
        if file is None:
            raise DllmError(
                f"{self.artifacts} has no vision graph for {soft_tokens} soft tokens per image (it has: "
                f"{', '.join(map(str, sorted(self.vision))) or 'none, a text-only export'}); pass --max-soft-tokens "
                "with one of those, or export with --max-soft-tokens " + str(soft_tokens)
            )
        feeds = dict(zip(VISION_INPUTS, (pixel_values.float(), position_ids.long())))
        return valid_rows(self._run(file, feeds)[VISION_OUTPUT], counts)


class OnnxRuntimeStep(_OnnxRuntimeBase, LogitsStep):
    """Exported graphs in onnxruntime: the step hands out logits, the sampling head runs in torch."""

    files = (STEP_FILE, SELF_CONDITIONING_FILE)

    @classmethod
    def from_artifacts(cls, artifacts: Path, device: str = "cpu", threads: int = 0) -> LogitsStep | OnnxRuntimeHeadStep:
        """The step for an export or optimize directory; optimized steps carry the sampling head.

        On CPU, graphs onnxruntime cannot run as they are (fused MoE nodes without a CPU kernel,
        bf16 math) run from a runnable copy in a temporary directory that lives as long as the step
        (generation.cpu_variant); `execution` says how.
        """
        from dllm_trt.generation import cpu_variant
        from dllm_trt.manifest import read_manifest

        manifest = read_manifest(artifacts)
        variant = None
        if device == "cpu" and cpu_variant.needs_cpu_variant(artifacts):
            reason = cpu_variant.unsupported_on_cpu(artifacts)
            if reason:
                raise DllmError(f"onnxruntime on CPU cannot run {artifacts}: {reason}")
            variant = tempfile.TemporaryDirectory(prefix="dllm-trt-cpu-variant-")
            cpu_variant.write_cpu_variant(artifacts, Path(variant.name))
            artifacts = Path(variant.name)
            manifest = read_manifest(artifacts)
        specs = [LayerSpec(**spec) for spec in manifest["model"]["layers"]]
        info = StepInfo.from_manifest(manifest)
        outputs = {o["name"] for o in manifest["graphs"]["step"]["outputs"]}
        kind = OnnxRuntimeHeadStep if SAMPLING_OUTPUTS[0] in outputs else cls
        inputs = {i["name"]: i["shape"] for i in manifest["graphs"]["step"]["inputs"]}
        if inputs.get(SAMPLING_INPUTS[0]) == []:
            raise DllmError(f"{artifacts} was optimized by an earlier dllm-trt (one temperature per call, not one "
                            "per row); run 'dllm-trt optimize' on its export again")  # fmt: skip
        step = kind(artifacts, specs, info, device, threads)
        step.vision = vision_files(manifest)
        step.pooling_kernel = (manifest["model"].get("vision") or {}).get("pooling_kernel_size", 1)
        step.execution = manifest.get("cpu_execution", "native") if device == "cpu" else f"onnxruntime {device}"
        step.variant = variant  # removed with the step
        return step

    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        feeds = denoiser_feeds(self, canvas_ids, self_conditioning, position_ids, cache_mask, past)
        return self._run(STEP_FILE, feeds)[LOGITS]

    def soft_embedding(self, processed_logits):  # noqa: ANN001, ANN201
        return self._run(SELF_CONDITIONING_FILE, {SOFT_EMBEDDING_INPUT: processed_logits})[SOFT_EMBEDDING_OUTPUT]


class OnnxRuntimeHeadStep(_OnnxRuntimeBase):
    """Optimized graphs in onnxruntime: the step samples inside; only [B, C]-sized results come out."""

    files = (STEP_FILE,)
    spin = True

    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        feeds = sampling_feeds(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise)
        out = self._run(STEP_FILE, feeds)
        return DenoiseSample(*(out[name] for name in SAMPLING_OUTPUTS))
