"""transformers' reference in bounded memory: its own model and forward, layers read on demand.

The reference is transformers' own model and forward, untouched; only where its weights live
changes. Everything outside the decoder layers (embedding = lm_head, final norm, the
self-conditioning block, derived buffers) is read once; each encoder or decoder layer's weights
are read from the checkpoint by a forward pre-hook and dropped by a forward hook, so at most one
layer is resident, whatever the number of layers (the vision tower's layers alike, where the
checkpoint has a tower). Weights are cast exactly as `from_pretrained`
casts them, so the numbers are those of a loaded model.

Export's parity check and `validate --per-layer` run it beside graphs they open one at a time, so
a graph's weights and the reference's layer are never resident together.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dllm_trt.errors import DllmError
from dllm_trt.models.checkpoint import TensorEntry, read_rows
from dllm_trt.models.skeleton import CheckpointSources, build_skeleton, is_fake
from dllm_trt.models.vision import has_vision_tower


class _Reader:
    """Real tensors for a skeleton's fake ones, from the checkpoint, cast to the skeleton's dtype."""

    def __init__(self, model, index: dict[str, TensorEntry], transform: Transform | None = None) -> None:  # noqa: ANN001
        self.sources = CheckpointSources(model, index)
        self.cache: dict[int, torch.Tensor] = {}
        self.transform = transform

    def real(self, fake: torch.Tensor) -> torch.Tensor:
        entry = self.sources.entry(fake)
        if entry is None:
            raise DllmError(f"the checkpoint lacks {self.sources.name(fake)}, which the reference model needs")
        tensor = read_rows(entry)
        if self.transform is not None:
            tensor = self.transform(self.sources.name(fake), tensor)
        return tensor.to(fake.dtype)  # the cast from_pretrained makes

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


# (checkpoint tensor name, its values as stored) -> the values the model is given, before the dtype cast
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def offloaded_reference(  # noqa: ANN201
    ckpt: Path,
    dtype: torch.dtype,
    index: dict[str, TensorEntry],
    transform: Transform | None = None,
    tower_only: bool = False,
):
    """transformers' DiffusionGemmaForBlockDiffusion of `ckpt` in `dtype`, holding at most one layer's weights.

    `transform` changes each weight as read (the envelope of a quantized artifact quantizes its experts so).
    `tower_only`: only the vision tower and its embedder are given weights (what get_image_features runs);
    the text model's embedding, a few GB at the released widths, is never read."""
    model = build_skeleton(ckpt, dtype)
    reader = _Reader(model, index, transform)
    tower = has_vision_tower(index)
    stacks = [model.model.encoder.language_model.layers, model.model.decoder.layers]
    if tower:
        stacks.append(model.model.encoder.vision_tower.encoder.layers)
    layer_modules = {id(m) for layers in stacks for layer in layers for m in layer.modules()}
    for name, module in model.named_modules():
        # a text-only checkpoint has no tower to read (transformers builds one for every config)
        if id(module) not in layer_modules and (tower or "vision" not in name) and (not tower_only or "vision" in name):
            reader.fill(module, resident=True)
    for layers in stacks:
        for layer in layers:
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
