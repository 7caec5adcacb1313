"""One Step interface over every backend: the encoder step and the denoise step, plain tensors in and out.

Backends differ only in how they run the graphs; the block-diffusion loop never changes.
Letters: B batch, T new tokens, C canvas, H hidden, V vocab, P cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dllm_trt.export.onnx_export import DENOISER_FILE, ENCODER_FILE, SELF_CONDITIONING_FILE, cache_names
from dllm_trt.models.diffusion_gemma import DenoiseStep, EncoderStep, LayerSpec, SoftEmbedding, layer_specs
from dllm_trt.runtime.sampler import sampling_head

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
    ) -> list[torch.Tensor]:
        """K/V of the T new tokens for every layer: key.0, value.0, ... each [B, G, T, D]."""  # fmt: skip

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
        """One denoise step and what the sampler needs from it (see runtime.sampler)."""  # fmt: skip


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
        processed = logits / temperature  # LinearTemperatureScheduleLogitsProcessor
        head = sampling_head(processed, noise)
        next_sc = self.soft_embedding(processed.to(self.info.dtype))
        return DenoiseSample(head.sampled, head.argmax, head.entropy, next_sc)


class TorchStep(LogitsStep):
    """The transformers modules themselves, with transformers' own experts implementation."""

    def __init__(self, model, dense_moe: bool = False) -> None:  # noqa: ANN001
        self.specs = layer_specs(model)
        self.info = StepInfo.from_model(model)
        self.encoder = EncoderStep(model, dense_moe=dense_moe)
        self.denoiser = DenoiseStep(model, dense_moe=dense_moe)
        self.soft = SoftEmbedding(model)

    @torch.no_grad()
    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):  # noqa: ANN001, ANN201
        return list(self.encoder(input_ids, position_ids, input_mask, cache_mask, *past))

    @torch.no_grad()
    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        return self.denoiser(canvas_ids, self_conditioning, position_ids, cache_mask, *past)

    @torch.no_grad()
    def soft_embedding(self, processed_logits):  # noqa: ANN001, ANN201
        return self.soft(processed_logits)


class _OnnxRuntimeBase:
    """Sessions and the encoder step shared by both onnxruntime step kinds."""

    def __init__(
        self, artifacts: Path, specs: list[LayerSpec], info: StepInfo, device: str = "cpu", threads: int = 0
    ) -> None:
        from dllm_trt.runtime.ort_session import open_session

        self.specs = specs
        self.info = info
        # only the sampling-head step leaves torch idle between runs, see ort_session.open_session
        spin = isinstance(self, OnnxRuntimeHeadStep)
        self.encoder = open_session(artifacts / ENCODER_FILE, device, threads=threads, spin=spin)
        self.denoiser = open_session(artifacts / DENOISER_FILE, device, threads=threads, spin=spin)
        self.past_names = cache_names(specs, "past_")
        self.new_names = cache_names(specs, "")

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        feeds = dict(input_ids=input_ids, position_ids=position_ids, input_mask=input_mask, cache_mask=cache_mask)
        feeds.update(zip(self.past_names, past))
        out = run(self.encoder, feeds)
        return [out[name] for name in self.new_names]

    def _denoise_feeds(self, canvas_ids, self_conditioning, position_ids, cache_mask, past) -> dict:  # noqa: ANN001
        feeds = dict(
            canvas_ids=canvas_ids, self_conditioning=self_conditioning, position_ids=position_ids, cache_mask=cache_mask
        )
        feeds.update(zip(self.past_names, past))
        return feeds


class OnnxRuntimeStep(_OnnxRuntimeBase, LogitsStep):
    """Exported graphs in onnxruntime: the denoiser hands out logits, the sampling head runs in torch."""

    def __init__(
        self, artifacts: Path, specs: list[LayerSpec], info: StepInfo, device: str = "cpu", threads: int = 0
    ) -> None:
        from dllm_trt.runtime.ort_session import open_session

        super().__init__(artifacts, specs, info, device, threads)
        self.soft = open_session(artifacts / SELF_CONDITIONING_FILE, device, threads=threads)

    @classmethod
    def from_artifacts(cls, artifacts: Path, device: str = "cpu", threads: int = 0) -> LogitsStep | OnnxRuntimeHeadStep:
        """The step for an export or optimize directory; optimized denoisers carry the sampling head."""
        from dllm_trt.manifest import read_manifest

        manifest = read_manifest(artifacts)
        specs = [LayerSpec(**spec) for spec in manifest["model"]["layers"]]
        info = StepInfo.from_manifest(manifest)
        outputs = {o["name"] for o in manifest["graphs"]["denoiser"]["outputs"]}
        kind = OnnxRuntimeHeadStep if "sampled_ids" in outputs else cls
        return kind(artifacts, specs, info, device, threads)

    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        feeds = self._denoise_feeds(canvas_ids, self_conditioning, position_ids, cache_mask, past)
        return run(self.denoiser, feeds)["logits"]

    def soft_embedding(self, processed_logits):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        return run(self.soft, dict(processed_logits=processed_logits))["self_conditioning"]


class OnnxRuntimeHeadStep(_OnnxRuntimeBase):
    """Optimized graphs in onnxruntime: the denoiser samples inside; only [B, C]-sized results come out."""

    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        feeds = self._denoise_feeds(canvas_ids, self_conditioning, position_ids, cache_mask, past)
        feeds["temperature"] = torch.as_tensor(temperature, dtype=torch.float32)
        feeds["sampling_noise"] = noise.view(canvas_ids.shape[0], canvas_ids.shape[1], -1)
        out = run(self.denoiser, feeds)
        return DenoiseSample(out["sampled_ids"], out["argmax_ids"], out["entropy"], out["next_self_conditioning"])
