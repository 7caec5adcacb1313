"""MoE experts in the formats the fused kernels read, made with torch on the device that runs them.

kernels.quantization holds the arithmetic in numpy: what `optimize --precision fp8|nvfp4` stores, and
the definition. This is the same arithmetic, operation for operation in fp32, in torch: a GPU quantizes a
released-size layer's experts in well under a second where the host's numpy takes tens of seconds, so
the CUDA backend and the GPU benches use it. It is bit-identical to the numpy definition (the tests
compare every byte: values, block scales, channel and global scales), so what they run is what
`optimize` stores.

Formats (contract.MOE_INPUTS): "float" keeps the experts in the activations' dtype; "fp8" holds e4m3
values and an fp32 scale per expert and output channel; "nvfp4" holds e2m1 codes two a byte (the even
element in the low nibble, ONNX's packing), an e4m3 scale per 16 values along the input axis and an fp32
scale per expert. Layout: gate_up_proj [E, 2I, H], down_proj [E, H, I], the reduction axis last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dllm_trt.kernels.quantization import FP4_MAX, FP8_MAX, NVFP4_BLOCK

# e2m1 code (sign bit 3) -> value; the magnitudes' round-to-nearest-even boundaries: a tie goes to the even code
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_ROUND_UP_FROM = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_CHUNK = 16  # experts quantized at a time: bounds the fp32 copy a layer's experts pass through


@dataclass
class StoredExperts:
    """One layer's experts as `fused_moe` takes them: the two weights, then `scales` in MOE_INPUTS order."""

    weight_format: str
    gate_up: torch.Tensor
    down: torch.Tensor
    scales: tuple[torch.Tensor, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read when every expert is routed to (values and scales)."""
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down, *self.scales))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 gate_up [E, 2I, H] and down [E, H, I]: the values the kernels compute with."""
        if self.weight_format == "float":
            return self.gate_up.float(), self.down.float()
        if self.weight_format == "fp8":
            gate_up_scale, down_scale = self.scales
            return self.gate_up.float() * gate_up_scale[..., None], self.down.float() * down_scale[..., None]
        gate_up_block, down_block, gate_up_global, down_global = self.scales
        return (dequantize_nvfp4(self.gate_up, gate_up_block, gate_up_global),
                dequantize_nvfp4(self.down, down_block, down_global))  # fmt: skip


def store_experts(weight_format: str, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> StoredExperts:
    """The experts (any float dtype) in `weight_format`; "float" keeps them in `dtype` (no copy when they are)."""
    if weight_format == "float":
        return StoredExperts("float", gate_up.to(dtype).contiguous(), down.to(dtype).contiguous())
    if weight_format == "fp8":
        (gu, gu_scale), (dn, dn_scale) = (_chunked(quantize_fp8, w) for w in (gate_up, down))
        return StoredExperts("fp8", gu, dn, (gu_scale, dn_scale))
    if weight_format == "nvfp4":
        (gu, gu_block, gu_global), (dn, dn_block, dn_global) = (_chunked(quantize_nvfp4, w) for w in (gate_up, down))
        return StoredExperts("nvfp4", gu, dn, (gu_block, dn_block, gu_global, dn_global))
    raise ValueError(f"unknown expert format '{weight_format}'; one of float, fp8, nvfp4")


def _chunked(quantize, w: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """quantize(w) a few experts at a time (every scale is per expert or finer, so chunks are independent)."""
    parts = [quantize(w[first : first + _CHUNK].float()) for first in range(0, w.shape[0], _CHUNK)]
    return tuple(torch.cat(pieces) for pieces in zip(*parts))


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, K] fp32 -> (e4m3 values [..., R, K], fp32 scale [..., R]): kernels.quantization.quantize_fp8."""
    scale = w.abs().amax(dim=-1) / FP8_MAX
    q = (w / _safe(scale)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [L, R, K] fp32 -> (packed e2m1 codes [L, R, K/2] uint8, e4m3 block scales [L, R, K/16], fp32 global
    scale [L]): kernels.quantization.quantize_nvfp4 followed by pack_fp4."""
    if w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the reduction axis to be a multiple of {NVFP4_BLOCK}, got {w.shape[-1]}")
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)  # [L, R, K/16, 16]
    global_scale = w.abs().amax(dim=(1, 2)) / (FP8_MAX * FP4_MAX)  # [L]
    expand = global_scale[:, None, None]
    block_scale = (blocks.abs().amax(dim=-1) / FP4_MAX / _safe(expand)).clamp(0, FP8_MAX).to(torch.float8_e4m3fn)
    divisor = block_scale.float() * expand  # [L, R, K/16]
    values = (blocks / _safe(divisor)[..., None]).clamp(-FP4_MAX, FP4_MAX).reshape(w.shape)
    codes = _e2m1_codes(values)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), block_scale, global_scale


def _e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """fp32 values within +-6 -> e2m1 codes (uint8, sign in bit 3), rounded to nearest, ties to even."""
    magnitude = values.abs()
    code = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for boundary, tie_up in _ROUND_UP_FROM:
        code += (magnitude >= boundary if tie_up else magnitude > boundary).to(torch.uint8)
    return code | (torch.signbit(values).to(torch.uint8) << 3)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Packed codes [L, R, K/2] -> fp32 [L, R, K]: kernels.quantization.dequantize_nvfp4 of the unpacked codes."""
    table = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32, device=packed.device)
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)  # [L, R, K]
    values = table[codes.long()].reshape(*codes.shape[:-1], -1, NVFP4_BLOCK)
    scale = block_scale.float() * global_scale.float()[:, None, None]
    return (values * scale[..., None]).reshape(codes.shape)
