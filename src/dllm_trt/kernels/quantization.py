"""Weight quantization of the experts and projections: fp8 per output channel and NVFP4, both ways.

One definition of the arithmetic, shared by the graph rewrite that stores quantized weights
(optimize.quantize), the CPU stand-in of the MoE plugin (generation.cpu_standins, through
``dequantize_experts``) and the tests of the Triton kernels that dequantize inside the kernel.

Layout: a weight is ``[..., R, K]``: R output channels, K the reduction (input) axis, last. The
plugin's expert weights are in this layout already (gate_up_proj [E, 2I, H], down_proj [E, H, I]);
the graph's pre-transposed projection weights [K, N] are quantized through their transpose.

fp8 (e4m3fn, finite max 448): ``scale[..., r] = max_k |w[..., r, k]| / 448`` (fp32), ``q = w /
scale`` rounded to nearest e4m3, clipped to +-448 first (an e4m3fn overflow is NaN, not inf).
Dequantized: ``q * scale``.

NVFP4 (the recipe of NVIDIA's ModelOpt and TensorRT): e2m1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and
their negatives), one e4m3 scale per 16 consecutive values along K, one fp32 global scale per
leading index (per expert; per tensor for a 2-D weight)::

    global      = amax(|w|) / (448 * 6)                     fp32, over all but the leading axis
    block_scale = e4m3(amax_block(|w|) / 6 / global)        <= 448 by construction
    q           = e2m1(w / (float(block_scale) * global))   clipped to +-6 (rounding a block scale
                                                             down can push a value just past 6)
    dequantized = float(q) * float(block_scale) * global

Zero blocks (or a block scale that underflows e4m3 to 0) quantize to zeros. Rounding is
round-to-nearest-even (ml_dtypes' conversions). Deterministic, from the weights alone: no
calibration data is involved, because nothing here quantizes an activation.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # float8e4m3fn's largest finite value
FP4_MAX = 6.0  # float4e2m1's largest value
NVFP4_BLOCK = 16  # values per block scale along K (the only block size TensorRT takes for FP4)
FP8 = ml_dtypes.float8_e4m3fn
FP4 = ml_dtypes.float4_e2m1fn


# The dense projections an fp8 or nvfp4 artifact stores in fp8 (checkpoint names): attention q/k/v/o and
# the dense GeGLU MLPs. Not the router (its logits choose experts: kept as the reference keeps it),
# not the embedding / tied LM head.
PROJECTION = re.compile(r"\.(self_attn\.[qkvo]|mlp\.(gate|up|down)|self_conditioning\.(gate|up|down))_proj\.weight")
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def as_stored(name: str, weight: np.ndarray, precision: str) -> np.ndarray | None:
    """The values (dequantized, fp32) an artifact of `precision` holds for the checkpoint tensor `name`
    ([..., out, in], the checkpoint's layout), or None where it keeps the tensor as it is."""
    if precision not in ("fp8", "nvfp4"):
        return None
    if name.endswith(EXPERTS):
        return (
            dequantize_nvfp4(*quantize_nvfp4(weight)) if precision == "nvfp4" else dequantize_fp8(*quantize_fp8(weight))
        )
    if PROJECTION.search("." + name.lstrip(".")):
        return dequantize_fp8(*quantize_fp8(weight))
    return None


def _per_block(global_scale: np.ndarray, ndim: int) -> np.ndarray:
    """An NVFP4 global scale ([L] or 0-d) shaped to broadcast against block scales of `ndim` dimensions."""
    return global_scale.reshape(global_scale.shape + (1,) * (ndim - global_scale.ndim))


def _safe(scale: np.ndarray) -> np.ndarray:
    """A divisor that is 1 where the scale is 0 (those values quantize to 0 whatever it is)."""
    return np.where(scale == 0, np.float32(1.0), scale)


def fp8_scale(w: np.ndarray) -> np.ndarray:
    """w [..., R, K] float -> its fp8 scale [..., R] fp32, per output channel."""
    return (np.abs(np.asarray(w, dtype=np.float32)).max(axis=-1) / np.float32(FP8_MAX)).astype(np.float32)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., R, K] float -> (q [..., R, K] float8e4m3fn, scale [..., R] fp32), per output channel."""
    w = np.asarray(w, dtype=np.float32)
    scale = fp8_scale(w)
    q = np.clip(w / _safe(scale)[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def nvfp4_global_scale(w: np.ndarray) -> np.ndarray:
    """w [L, R, K] (or [R, K]) float -> its NVFP4 global scale, [L] fp32 (0-d for a 2-D w)."""
    w = np.asarray(w, dtype=np.float32)
    reduce = tuple(range(1, w.ndim)) if w.ndim > 2 else None
    return (np.abs(w).max(axis=reduce).astype(np.float32) / np.float32(FP8_MAX * FP4_MAX)).astype(np.float32)


def nvfp4_scales(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [L, R, K] (or [R, K]) float -> (block_scale [.., R, K/16] float8e4m3fn, global_scale): the scale
    half of quantize_nvfp4, without rounding the values (a fraction of its cost)."""
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the reduction axis to be a multiple of {NVFP4_BLOCK}, got {w.shape[-1]}")
    block_amax = np.abs(w.reshape(*w.shape[:-1], w.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)).max(axis=-1)
    global_scale = nvfp4_global_scale(w)
    expand = _per_block(global_scale, block_amax.ndim)
    block_scale = np.clip(block_amax / np.float32(FP4_MAX) / _safe(expand), 0, FP8_MAX).astype(FP8)
    return block_scale, global_scale


def quantize_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [L, R, K] (or [R, K]) float -> (q float4e2m1 like w, block_scale [.., R, K/16] float8e4m3fn,
    global_scale [L] fp32 (a 0-d array for a 2-D w)). K must be a multiple of 16."""
    w = np.asarray(w, dtype=np.float32)
    block_scale, global_scale = nvfp4_scales(w)
    divisor = block_scale.astype(np.float32) * _per_block(global_scale, block_scale.ndim)  # [..., R, K/16]
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    q = np.clip(blocks / _safe(divisor)[..., None], -FP4_MAX, FP4_MAX).reshape(w.shape).astype(FP4)
    return q, block_scale, global_scale


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[..., R, K] values times their channel's scale, in fp32."""
    return np.asarray(q).astype(np.float32) * np.asarray(scale, np.float32)[..., None]


def dequantize_nvfp4(q: np.ndarray, block_scale: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """[..., R, K] e2m1 values times their block's e4m3 scale times the global scale, in fp32."""
    values = np.asarray(q).astype(np.float32)
    blocks = values.reshape(*values.shape[:-1], -1, NVFP4_BLOCK)
    scale = np.asarray(block_scale).astype(np.float32)  # [..., R, K/16]
    scale = scale * _per_block(np.asarray(global_scale, np.float32), scale.ndim)
    return (blocks * scale[..., None]).reshape(values.shape)


def dequantize_experts(weight_format: str, gate_up_proj, down_proj, *scales) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The DllmMoE node's expert inputs (contract.MOE_INPUTS[weight_format], from gate_up_proj on) ->
    fp32 gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    if weight_format == "float":
        return np.asarray(gate_up_proj, np.float32), np.asarray(down_proj, np.float32)
    if weight_format == "fp8":
        gate_up_scale, down_scale = scales
        return dequantize_fp8(gate_up_proj, gate_up_scale), dequantize_fp8(down_proj, down_scale)
    if weight_format == "nvfp4":
        gate_up_block, down_block, gate_up_global, down_global = scales
        return (
            dequantize_nvfp4(gate_up_proj, gate_up_block, gate_up_global),
            dequantize_nvfp4(down_proj, down_block, down_global),
        )
    raise ValueError(f"unknown DllmMoE weight_format '{weight_format}'")


def pack_fp4(q: np.ndarray) -> np.ndarray:
    """float4e2m1 [..., K] -> uint8 [..., K/2], two codes a byte, the even element in the low nibble
    (ONNX's FLOAT4E2M1 packing; what the kernels read)."""
    codes = np.asarray(q, dtype=FP4).view(np.uint8) & 0x0F
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., K/2] -> float4e2m1 [..., K] (the inverse of pack_fp4)."""
    packed = np.asarray(packed, np.uint8)
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    return codes.astype(np.uint8).view(FP4)
