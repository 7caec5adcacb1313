"""The runtime's KV cache: preallocated once, owned by the runtime, read by every backend.

Full layers hold every committed position up to `max_length`. Sliding layers hold only the last
`window - 1` positions, as transformers' DynamicSlidingWindowLayer does, so their memory is
bounded however long the context grows.

Each layer's K and V live in one flat preallocated storage, laid out so that the current
[B, G, P, D] tensor is contiguous at the start of it. A backend can then bind it by address
(TensorRT) or hand it over without a copy (onnxruntime) on every denoise step; the price is
one re-layout per committed canvas, when P grows. Letters: B batch, G key/value heads,
P positions, T new positions, D head dim.
"""

from __future__ import annotations

import torch

from dllm_trt.models.diffusion_gemma import LayerSpec


class StaticKVCache:
    def __init__(
        self,
        specs: list[LayerSpec],
        batch: int,
        max_length: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.specs = specs
        self.batch = batch
        self.max_length = max_length
        self.sliding_capacity = min(max_length, window - 1)
        self.length = 0
        self.storage: list[torch.Tensor] = []  # key.0, value.0, key.1, ...: flat, capacity B*G*P_max*D
        for spec in specs:
            capacity = self.sliding_capacity if spec.sliding else max_length
            for _ in ("key", "value"):
                size = batch * spec.num_kv_heads * capacity * spec.head_dim
                self.storage.append(torch.zeros(size, dtype=dtype, device=device))
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)  # [B, P]

    @property
    def sliding_length(self) -> int:
        return min(self.length, self.sliding_capacity)

    def _used(self, spec: LayerSpec) -> int:
        return self.sliding_length if spec.sliding else self.length

    def _view(self, index: int, positions: int) -> torch.Tensor:
        spec = self.specs[index // 2]
        shape = (self.batch, spec.num_kv_heads, positions, spec.head_dim)
        return self.storage[index][: shape[0] * shape[1] * shape[2] * shape[3]].view(shape)

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's K/V as contiguous [B, G, P_layer, D] tensors, in graph input order."""
        return [self._view(index, self._used(self.specs[index // 2])) for index in range(len(self.storage))]

    def mask(self) -> torch.Tensor:
        """Validity of the cached positions [B, P]: False where the prompt was padded."""
        return self.valid[:, : self.length]

    def append(self, new: list[torch.Tensor], new_valid: torch.Tensor) -> None:
        """Commit the K/V of T new positions ([B, G, T, D] per layer, graph output order)."""
        tokens = new_valid.shape[1]
        if self.length + tokens > self.max_length:
            raise ValueError(f"KV cache full: {self.length} + {tokens} positions > max_length {self.max_length}")
        for index, tensor in enumerate(new):
            spec = self.specs[index // 2]
            old = self._used(spec)
            tensor = tensor.to(self.storage[index].dtype)
            capacity = self.sliding_capacity if spec.sliding else self.max_length
            if old + tokens <= capacity:
                self._grow(index, old, old + tokens)
                self._view(index, old + tokens)[:, :, old:] = tensor
            else:
                # A full sliding layer: keep the last `window - 1` positions, contiguous and in order.
                merged = torch.cat([self._view(index, old), tensor], dim=2)[:, :, -capacity:]
                self._view(index, capacity).copy_(merged)
        self.valid[:, self.length : self.length + tokens] = new_valid
        self.length += tokens

    def _grow(self, index: int, old: int, new: int) -> None:
        """Re-lay rows [B*G] of `old` positions out at the stride of `new`, in place.

        Rows move right, so they are moved last first; each row is cloned before it is written
        because its destination may overlap its own source.
        """
        if old == 0:
            return
        spec = self.specs[index // 2]
        row_old, row_new = old * spec.head_dim, new * spec.head_dim
        flat = self.storage[index]
        for row in reversed(range(1, self.batch * spec.num_kv_heads)):
            flat[row * row_new : row * row_new + row_old] = flat[row * row_old : (row + 1) * row_old].clone()


class AlignedKVCache:
    """One request's KV cache in a fixed layout, so that rows of different lengths batch without padding changes.

    Every layer holds a fixed number of slots (full layers `max_length`, sliding layers `window - 1`,
    as StaticKVCache keeps them) with the valid positions right-aligned: the newest position is always
    the last slot and padding is on the left, where the step's mask (`mask()`) hides it. Rows of
    different lengths then stack into one batch without re-padding, and a row is laid out the same
    whether it runs alone or with 15 others, so its arithmetic is the same bits either way
    (reductions over the keys see the same slots in the same lanes). The price: attention over
    `max_length` slots, and a shift of the row's slots on every append (once per committed canvas).
    Letters: G key/value heads, S slots, T new positions, D head dim.
    """

    def __init__(
        self,
        specs: list[LayerSpec],
        max_length: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.specs = specs
        self.max_length = max_length
        self.sliding_capacity = min(max_length, window - 1)
        self.length = 0
        self.layers: list[torch.Tensor] = []  # key.0, value.0, key.1, ...: [1, G, S, D]
        for spec in specs:
            slots = self.sliding_capacity if spec.sliding else max_length
            for _ in ("key", "value"):
                self.layers.append(torch.zeros(1, spec.num_kv_heads, slots, spec.head_dim, dtype=dtype, device=device))
        self.valid = torch.zeros(1, max_length, dtype=torch.bool, device=device)  # [1, S_full]

    def tensors(self) -> list[torch.Tensor]:
        """Every layer's K/V [1, G, S, D] in graph input order (S fixed per layer type)."""
        return self.layers

    def mask(self) -> torch.Tensor:
        """Validity of the full layers' slots [1, S_full]; the sliding layers' slots are its last ones."""
        return self.valid

    def append(self, new: list[torch.Tensor]) -> None:
        """Commit the K/V of T new positions ([1, G, T, D] per layer, graph output order), all valid."""
        tokens = new[0].shape[2]
        if self.length + tokens > self.max_length:
            raise ValueError(f"KV cache full: {self.length} + {tokens} positions > max_length {self.max_length}")
        for layer, tensor in zip(self.layers, new):
            slots = layer.shape[2]
            tensor = tensor.to(layer.dtype)
            if tokens >= slots:  # a sliding layer keeps the last `window - 1` positions
                layer.copy_(tensor[:, :, tokens - slots :])
            else:
                layer[:, :, : slots - tokens] = layer[:, :, tokens:].clone()
                layer[:, :, slots - tokens :] = tensor
        self.valid[:, : self.max_length - tokens] = self.valid[:, tokens:].clone()
        self.valid[:, self.max_length - tokens :] = True
        self.length += tokens
