"""The parity check in bounded memory: transformers' reference with layers read on demand, one ORT session at a time.

The reference is transformers' own model and forward, untouched; only where its weights live
changes. Everything outside the decoder layers (embedding = lm_head, final norm, the
self-conditioning block, derived buffers) is read once; each encoder or decoder layer's weights
are read from the checkpoint by a forward pre-hook and dropped by a forward hook, so at most one
layer is resident, whatever the number of layers. Weights are cast exactly as `from_pretrained`
casts them, so the numbers are those of a loaded model.

The exported graphs run in onnxruntime one session at a time, each opened for its call and
closed after it, so a graph's weights and the reference's layer are never resident together.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_trt.errors import DllmError
from dllm_trt.export.onnx_export import DENOISER_FILE, ENCODER_FILE, SELF_CONDITIONING_FILE, cache_names
from dllm_trt.export.skeleton import CheckpointSources, build_skeleton, is_fake
from dllm_trt.export.weights import WeightRecipe
from dllm_trt.models.checkpoint import TensorEntry
from dllm_trt.models.diffusion_gemma import LayerSpec
from dllm_trt.runtime.step import LogitsStep, StepInfo


class _Reader:
    """Real tensors for a skeleton's fake ones, from the checkpoint, cast to the skeleton's dtype."""

    def __init__(self, model, index: dict[str, TensorEntry]) -> None:  # noqa: ANN001
        self.sources = CheckpointSources(model, index)
        self.cache: dict[int, torch.Tensor] = {}

    def real(self, fake: torch.Tensor) -> torch.Tensor:
        entry = self.sources.entry(fake)
        if entry is None:
            raise DllmError(f"the checkpoint lacks {self.sources.name(fake)}, which the reference model needs")
        return WeightRecipe(entry, fake.dtype).materialize()

    def fill(self, module: torch.nn.Module, resident: bool) -> None:
        """Replace every fake tensor directly in `module` by its real value (shared ones once if resident)."""
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not is_fake(tensor):
                    continue
                if resident and id(tensor) in self.cache:
                    real = self.cache[id(tensor)]
                else:
                    real = self.real(tensor)
                    if resident:
                        self.cache[id(tensor)] = real
                store[name] = torch.nn.Parameter(real, requires_grad=False) if store is module._parameters else real


def offloaded_reference(ckpt: Path, dtype: torch.dtype, index: dict[str, TensorEntry]):  # noqa: ANN201
    """transformers' DiffusionGemmaForBlockDiffusion of `ckpt` in `dtype`, holding at most one layer's weights."""
    model = build_skeleton(ckpt, dtype)
    reader = _Reader(model, index)
    text_models = (model.model.encoder.language_model, model.model.decoder)
    layer_modules = {id(m) for text in text_models for layer in text.layers for m in layer.modules()}
    for name, module in model.named_modules():
        if id(module) not in layer_modules and "vision" not in name:  # the vision tower is not exported
            reader.fill(module, resident=True)
    for text in text_models:
        for layer in text.layers:
            layer.register_forward_pre_hook(_load_layer(reader))
            layer.register_forward_hook(_drop_layer())
    return model


def _load_layer(reader: _Reader):  # noqa: ANN202
    def hook(layer: torch.nn.Module, args) -> None:  # noqa: ANN001
        saved = {}
        for module in layer.modules():
            saved[id(module)] = (dict(module._parameters), dict(module._buffers))
            reader.fill(module, resident=False)
        layer._dllm_fakes = saved

    return hook


def _drop_layer():  # noqa: ANN202
    def hook(layer: torch.nn.Module, args, output) -> None:  # noqa: ANN001
        saved = layer.__dict__.pop("_dllm_fakes")
        for module in layer.modules():
            params, buffers = saved[id(module)]
            module._parameters.update(params)
            module._buffers.update(buffers)

    return hook


class OneSessionStep(LogitsStep):
    """The exported graphs in onnxruntime, each opened for one call and closed after it.

    At most one graph's weights are resident, and never while the reference holds a layer:
    reopening costs a read of the graph's weights per call, a few calls per parity check.
    """

    def __init__(self, artifacts: Path, specs: list[LayerSpec], info: StepInfo, threads: int = 0) -> None:
        self.artifacts = artifacts
        self.specs = specs
        self.info = info
        self.threads = threads
        self.past_names = cache_names(specs, "past_")
        self.new_names = cache_names(specs, "")

    def _run(self, file: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from dllm_trt.runtime.ort_session import open_session, run

        session = open_session(self.artifacts / file, threads=self.threads)
        try:
            return run(session, feeds)
        finally:
            del session  # frees the graph's weights before the reference or the next graph needs the memory

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):  # noqa: ANN001, ANN201
        feeds = dict(input_ids=input_ids, position_ids=position_ids, input_mask=input_mask, cache_mask=cache_mask)
        feeds.update(zip(self.past_names, past))
        out = self._run(ENCODER_FILE, feeds)
        return [out[name] for name in self.new_names]

    def denoise(self, canvas_ids, self_conditioning, position_ids, cache_mask, past):  # noqa: ANN001, ANN201
        feeds = dict(
            canvas_ids=canvas_ids, self_conditioning=self_conditioning, position_ids=position_ids, cache_mask=cache_mask
        )
        feeds.update(zip(self.past_names, past))
        return self._run(DENOISER_FILE, feeds)["logits"]

    def soft_embedding(self, processed_logits):  # noqa: ANN001, ANN201
        return self._run(SELF_CONDITIONING_FILE, dict(processed_logits=processed_logits))["self_conditioning"]
