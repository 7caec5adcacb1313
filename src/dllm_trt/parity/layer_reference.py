"""What every layer of transformers' reference takes in and computes, recorded by hooks on its own forward.

The reference is transformers' model in fp32 with its layers read on demand (models.offloaded), so
memory holds one layer whatever the depth. Hooks on each layer record its input (the residual
stream, RoPE tables, mask, cache) and output, on each of its norms their input and output, on its
router the probabilities and picks; after an encoder call the layer's new K/V are read from the
cache. Nothing of the forward is restated here.

The envelope of a reduced-precision artifact is measured on the same layer while its weights are
loaded: transformers' layer run again in that dtype (weights cast as from_pretrained casts them,
and for fp8/nvfp4 artifacts quantized as they store them) on the fp32 layer's very inputs. It is
local, like the artifact's comparison (every layer of the artifact starts from the reference's
input too), so a layer's error is its own, not its predecessors'.
Letters: B batch, T tokens, N = B*T, E experts, K picks, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from dllm_trt.kernels.quantization import as_stored

NORMS = (
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm_1",
    "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2", "post_feedforward_layernorm",
)  # fmt: skip
HOOK_STORES = ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")  # fmt: skip


@dataclass
class LayerRun:
    """One layer on one call: tensors by name ('input_layernorm.out', 'router.probs', 'output', 'key', ...)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerRecord:
    hidden_in: torch.Tensor  # [B, T, H] fp32: what the artifact's layer is given too
    reference: LayerRun
    envelope: LayerRun | None  # transformers in the artifact's dtype on the same inputs


@dataclass
class CallRecord:
    kind: str  # "encode" | "denoise"
    label: str
    layers: list[LayerRecord] = field(default_factory=list)
    final_hidden: torch.Tensor | None = None  # the last layer's output [B, T, H]
    logits: torch.Tensor | None = None  # denoise calls: [B, T, V] fp32


def envelope_weights(module: torch.nn.Module, dtype: torch.dtype, precision: str, prefix: str = "") -> dict:
    """`module`'s weights as an artifact of `precision` holds them, in `dtype`: cast as from_pretrained casts, and
    for fp8/nvfp4 the quantized ones quantized the same way (kernels.quantization: the envelope of a quantized
    artifact is the reference quantized as it is, against the reference)."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        stored = as_stored(prefix + name, tensor.detach().float().numpy(), precision)
        out[name] = (tensor.detach() if stored is None else torch.from_numpy(stored)).to(dtype)
    return out


def record_norm(recorder, name: str):  # noqa: ANN001, ANN201
    """A forward hook keeping a norm's input and output in the recorder's current layer run (`recorder._run`,
    None outside a recorded layer)."""

    def hook(module, inputs, output) -> None:  # noqa: ANN001
        run = recorder._run
        if run is not None:
            run.tensors[f"{name}.in"] = inputs[0].detach().float().clone()
            run.tensors[f"{name}.out"] = output.detach().float().clone()

    return hook


def envelope_call(recorder, layer, weights: dict, hidden: torch.Tensor, kwargs: dict) -> LayerRun:  # noqa: ANN001
    """`layer` called once more with `weights` (its envelope copy) on inputs already in the envelope's dtype;
    the recorder's norm hooks fill the returned run (its `output` included), the layer's own hooks (the
    recorder's layer hooks, the offloader's) are set aside for the call."""
    stashed = {store: getattr(layer, store) for store in HOOK_STORES}
    for store in HOOK_STORES:
        setattr(layer, store, type(stashed[store])())
    recorder._run = LayerRun()
    try:
        output = torch.func.functional_call(layer, weights, (hidden,), kwargs)
    finally:
        for store, hooks in stashed.items():
            setattr(layer, store, hooks)
        run, recorder._run = recorder._run, None
    run.tensors["output"] = output.detach().float()
    return run


def as_layer_input(value, dtype: torch.dtype):  # noqa: ANN001, ANN202
    """An fp32 layer input as the same layer would get it in `dtype` (bool masks stay bool)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            if value.min() < -1e30:  # an additive mask: its own dtype's most negative value, as transformers makes it
                return torch.where(value < 0, torch.finfo(dtype).min, 0.0).to(dtype)
            return value.to(dtype)
        return value
    if isinstance(value, tuple):
        return tuple(as_layer_input(v, dtype) for v in value)
    return value


class LayerRecorder:
    """Hooks on the encoder's and the decoder's layers of an offloaded transformers model."""

    def __init__(self, model, envelope_dtype: torch.dtype | None, precision: str = "") -> None:  # noqa: ANN001
        self.model, self.envelope_dtype, self.precision = model, envelope_dtype, precision
        self.config = model.config.get_text_config(decoder=True)
        self.calls: list[CallRecord] = []
        self._run: LayerRun | None = None  # where the norm and router hooks write now
        self._inputs: tuple | None = None
        self.handles = []
        for text in (model.model.encoder.language_model, model.model.decoder):
            for layer in text.layers:
                self.handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
                # prepend: runs before models.offloaded drops the layer's weights
                self.handles.append(layer.register_forward_hook(self._after, with_kwargs=True, prepend=True))
                for name in NORMS:
                    self.handles.append(getattr(layer, name).register_forward_hook(record_norm(self, name)))
                self.handles.append(layer.router.register_forward_hook(self._router))

    def start(self, kind: str, label: str) -> CallRecord:
        self.calls.append(CallRecord(kind, label))
        return self.calls[-1]

    def _router(self, module, inputs, outputs) -> None:  # noqa: ANN001
        if self._run is not None:
            probs, _, picks = outputs
            self._run.tensors["router.probs"] = probs.detach().float().clone()
            self._run.tensors["router.picks"] = picks.detach().clone()

    def _before(self, layer, args, kwargs) -> None:  # noqa: ANN001
        self._inputs = (args, kwargs)
        self._run = LayerRun()

    def _after(self, layer, args, kwargs, output) -> None:  # noqa: ANN001
        call = self.calls[-1]
        run, self._run = self._run, None
        run.tensors["output"] = output.detach().float().clone()
        index = layer.self_attn.layer_idx
        tokens = args[0].shape[1]
        cache = kwargs.get("cache")
        if call.kind == "encode":
            run.tensors["key"] = cache.layers[index].keys[:, :, -tokens:].float().clone()
            run.tensors["value"] = cache.layers[index].values[:, :, -tokens:].float().clone()
        envelope = self._envelope(layer, args, kwargs, call.kind) if self.envelope_dtype is not None else None
        call.layers.append(LayerRecord(args[0].detach().float().clone(), run, envelope))

    def _envelope(self, layer, args, kwargs, kind: str) -> LayerRun:  # noqa: ANN001
        """The same layer in the envelope's dtype on the same inputs (its own cache, seeded as the fp32 one was)."""
        dtype, index = self.envelope_dtype, layer.self_attn.layer_idx
        weights = envelope_weights(layer, dtype, self.precision)
        cache = DynamicCache(config=self.config)
        if kind == "denoise":  # the decoder reads the encoder's K/V; the encoder's own call starts empty
            seen = kwargs["cache"].layers[index]
            cache.update(seen.keys.to(dtype), seen.values.to(dtype), index)
        low_kwargs = {k: (cache if k == "cache" else as_layer_input(v, dtype)) for k, v in kwargs.items()}
        run = envelope_call(self, layer, weights, as_layer_input(args[0], dtype), low_kwargs)
        if kind == "encode":
            tokens = args[0].shape[1]
            run.tensors["key"] = cache.layers[index].keys[:, :, -tokens:].float()
            run.tensors["value"] = cache.layers[index].values[:, :, -tokens:].float()
        return run

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
