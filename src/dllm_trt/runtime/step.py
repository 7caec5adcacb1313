"""One Step interface over every backend: the encoder step and the denoise step, plain tensors in and out.

Backends differ only in how they run the two graphs; the block-diffusion loop never changes.
Letters: B batch, T new tokens, C canvas, H hidden, V vocab, P cached positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from dllm_trt.export.onnx_export import DENOISER_FILE, ENCODER_FILE, cache_names
from dllm_trt.models.diffusion_gemma import DenoiseStep, EncoderStep, LayerSpec, layer_specs


class Step(Protocol):
    specs: list[LayerSpec]

    def encode(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        input_mask: torch.Tensor,
        cache_mask: torch.Tensor,
        past: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """K/V of the T new tokens for every layer: key.0, value.0, ... each [B, G, T, D]."""

    def denoise(
        self,
        canvas_ids: torch.Tensor,
        self_conditioning: torch.Tensor,
        position_ids: torch.Tensor,
        cache_mask: torch.Tensor,
        past: list[torch.Tensor],
    ) -> torch.Tensor:
        """Softcapped fp32 logits [B, C, V]."""


class TorchStep:
    """The transformers modules themselves (through dllm-trt's export-friendly wrappers)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.specs = layer_specs(model)
        self.encoder = EncoderStep(model)
        self.denoiser = DenoiseStep(model)

    @torch.no_grad()
    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):  # noqa: ANN001, ANN201
        return list(self.encoder(input_ids, position_ids, input_mask, cache_mask, *past))

    @torch.no_grad()
    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        return self.denoiser(canvas_ids, self_conditioning, position_ids, cache_mask, *past)


class OnnxRuntimeStep:
    """The exported (or optimized) graphs in onnxruntime."""

    def __init__(self, artifacts: Path, specs: list[LayerSpec], device: str = "cpu", threads: int = 0) -> None:
        from dllm_trt.runtime.ort_session import open_session

        self.specs = specs
        self.encoder = open_session(artifacts / ENCODER_FILE, device, threads=threads)
        self.denoiser = open_session(artifacts / DENOISER_FILE, device, threads=threads)
        self.past_names = cache_names(specs, "past_")
        self.new_names = cache_names(specs, "")

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        feeds = dict(input_ids=input_ids, position_ids=position_ids, input_mask=input_mask, cache_mask=cache_mask)
        feeds.update(zip(self.past_names, past))
        out = run(self.encoder, feeds)
        return [out[name] for name in self.new_names]

    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        from dllm_trt.runtime.ort_session import run

        feeds = dict(
            canvas_ids=canvas_ids, self_conditioning=self_conditioning, position_ids=position_ids, cache_mask=cache_mask
        )
        feeds.update(zip(self.past_names, past))
        return run(self.denoiser, feeds)["logits"]
