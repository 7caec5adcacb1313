"""The runtime's KV cache: preallocated once, owned by the runtime, read by every backend.

Full layers hold every committed position up to `max_length`. Sliding layers hold only the last
`window - 1` positions, as transformers' DynamicSlidingWindowLayer does, so their memory is
bounded however long the context grows. Letters: B batch, G key/value heads, P positions, D head dim.
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
        self.max_length = max_length
        self.sliding_capacity = min(max_length, window - 1)
        self.length = 0
        self.buffers: list[torch.Tensor] = []  # key.0, value.0, key.1, ...: [B, G, capacity, D]
        for spec in specs:
            capacity = self.sliding_capacity if spec.sliding else max_length
            for _ in ("key", "value"):
                self.buffers.append(
                    torch.zeros(batch, spec.num_kv_heads, capacity, spec.head_dim, dtype=dtype, device=device)
                )
        self.valid = torch.zeros(batch, max_length, dtype=torch.bool, device=device)  # [B, P]

    @property
    def sliding_length(self) -> int:
        return min(self.length, self.sliding_capacity)

    def tensors(self) -> list[torch.Tensor]:
        """The filled part of every layer's K/V, in graph input order: [B, G, P_layer, D]."""
        out = []
        for spec in self.specs:
            used = self.sliding_length if spec.sliding else self.length
            for kind in (0, 1):
                out.append(self.buffers[2 * spec.index + kind][:, :, :used])
        return out

    def mask(self) -> torch.Tensor:
        """Validity of the cached positions [B, P]: False where the prompt was padded."""
        return self.valid[:, : self.length]

    def append(self, new: list[torch.Tensor], new_valid: torch.Tensor) -> None:
        """Commit the K/V of T new positions ([B, G, T, D] per layer, graph output order)."""
        tokens = new_valid.shape[1]
        if self.length + tokens > self.max_length:
            raise ValueError(f"KV cache full: {self.length} + {tokens} positions > max_length {self.max_length}")
        for spec in self.specs:
            for kind in (0, 1):
                buffer = self.buffers[2 * spec.index + kind]
                tensor = new[2 * spec.index + kind].to(buffer.dtype)
                if not spec.sliding:
                    buffer[:, :, self.length : self.length + tokens] = tensor
                    continue
                kept = self.sliding_length
                if kept + tokens <= self.sliding_capacity:
                    buffer[:, :, kept : kept + tokens] = tensor
                else:
                    # Shift left so the last `window - 1` positions stay contiguous and in order.
                    merged = torch.cat([buffer[:, :, :kept], tensor], dim=2)[:, :, -self.sliding_capacity :]
                    buffer.copy_(merged)
        self.valid[:, self.length : self.length + tokens] = new_valid
        self.length += tokens
