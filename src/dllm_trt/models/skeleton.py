"""A DiffusionGemma model without weights: what the streaming export traces.

The model is built the way transformers' `from_pretrained` builds it (its own init contexts,
on the meta device, ties applied), so module structure, parameter names, dtypes and tied
parameters are exactly those of a loaded model. Then:

- parameters and persistent buffers become fake CPU tensors: shape and dtype, no storage, so
  torch.export traces them as it traces real ones;
- non-persistent buffers (RoPE inverse frequencies, the vision tower's included, the embedding
  scale) are computed for real by transformers' own `_init_weights`: they are derived from the
  config, not stored.

Every fake tensor is later given its bytes from the checkpoint (see `weights.py`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dllm_trt.errors import DllmError
from dllm_trt.models.checkpoint import TensorEntry

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise DllmError(f"unknown dtype '{name}'; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def checkpoint_dtype(config: dict, index: dict[str, TensorEntry]) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` picks: config.json's, else the first floating tensor's."""
    for holder in (config, config.get("text_config") or {}):
        name = holder.get("dtype") or holder.get("torch_dtype")
        if isinstance(name, str) and name in _DTYPES:
            return _DTYPES[name]
    for entry in index.values():
        if entry.dtype.is_floating_point:
            return entry.dtype
    return torch.float32


def build_skeleton(ckpt: Path, dtype: torch.dtype):  # noqa: ANN201 (transformers type)
    """The model of `ckpt` with fake parameters in `dtype` and real derived buffers; nothing is read but config.json."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        config = DiffusionGemmaConfig.from_pretrained(ckpt)
        with contextlib.ExitStack() as stack:
            for context in DiffusionGemmaForBlockDiffusion.get_init_context(dtype, False, False, None):
                stack.enter_context(context)
            model = DiffusionGemmaForBlockDiffusion(config)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DllmError(f"transformers could not build the model of {ckpt}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    persistent = set(model.state_dict())
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # By id of the meta tensor (kept alive beside its fake), so that tied tensors stay one tensor.
    fakes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fake(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in fakes:
            with fake_mode:
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            fakes[id(tensor)] = (tensor, torch.nn.Parameter(empty, requires_grad=False) if parameter else empty)
        return fakes[id(tensor)][1]

    for prefix, module in model.named_modules():
        derived = False
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = fake(param, parameter=True)
        for name, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            if f"{prefix}.{name}".lstrip(".") in persistent:
                module._buffers[name] = fake(buffer, parameter=False)
            else:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
                derived = True
        if derived and hasattr(module, "compute_axial_rope_parameters"):
            # the vision tower's 2-D RoPE: DiffusionGemma's _init_weights looks "axial" up among the 1-D
            # RoPE types and fails (transformers 5.25); the module's own function is what its __init__ calls
            inv_freq, _ = module.compute_axial_rope_parameters(module.config)
            module.inv_freq, module.original_inv_freq = inv_freq, inv_freq.clone()
        elif derived:
            model._init_weights(module)
    # from_pretrained builds untied and ties after loading: tied names (lm_head and the embedding,
    # every encoder layer and its decoder layer) become one tensor, read from one checkpoint tensor.
    model.tie_weights()
    return model.eval()


def is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


class CheckpointSources:
    """Which checkpoint tensor holds the bytes of each tensor of a model (tied tensors have one source)."""

    def __init__(self, model, index: dict[str, TensorEntry]) -> None:  # noqa: ANN001
        self.index = index
        self.names: dict[int, list[str]] = {}  # id(tensor) -> every state-dict name it has in `model`
        for name, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]:
            self.names.setdefault(id(tensor), []).append(name)
        # from_pretrained reads a tied tensor from its source key (the embedding for lm_head, the
        # decoder layer for its encoder layer); the checkpoint usually holds only that one.
        tied_targets = set(getattr(model, "all_tied_weights_keys", {}) or {})
        for names in self.names.values():
            names.sort(key=lambda name: name in tied_targets)

    def entry(self, tensor: torch.Tensor) -> TensorEntry | None:
        return next((self.index[k] for k in self.names.get(id(tensor), []) if k in self.index), None)

    def name(self, tensor: torch.Tensor) -> str | None:
        names = self.names.get(id(tensor))
        return names[0] if names else None
