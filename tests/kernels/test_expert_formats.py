"""kernels.expert_formats (torch, on any device) against kernels.quantization (numpy, what optimize stores):
every byte of the values and scales equal, rounding ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dllm_trt.kernels.expert_formats import StoredExperts, store_experts
from dllm_trt.kernels.moe_triton import quantized_experts
from dllm_trt.kernels.quantization import dequantize_experts

E, H, I = 20, 64, 48  # noqa: E741  more experts than one quantization chunk holds


def _experts() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) * torch.rand(E, 1, 1, generator=gen) / I**0.5
    gate_up[3, 5] = 0.0  # a zero row: zero blocks, a zero channel scale
    down[4] = 0.0  # a zero expert: a zero global scale
    # Expert 7's amax 10.5 gives an exact global scale 2^-8, block scale 448 and divisor 1.75, so its first
    # row divided by it hits every e2m1 rounding tie (0.25 ... 5), both signs, and -0.
    up = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    ties = torch.tensor(up + [-t for t in up[:-1]] + [-0.0])
    gate_up[7] = 0.0
    gate_up[7, 0, :16] = ties * 1.75
    gate_up[7, 1, :16] = 0.5 * 1.75 + ties * 1e-3  # one value just off each tie
    return gate_up, down


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy() if t.element_size() == 1 else t.numpy()


@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_torch_experts_are_byte_identical_to_what_optimize_stores(weight_format):
    gate_up, down = _experts()
    ours = store_experts(weight_format, gate_up, down, torch.bfloat16)
    theirs, stored = quantized_experts(weight_format, gate_up.numpy(), down.numpy())
    mine = (ours.gate_up, ours.down, *ours.scales)
    assert [tuple(t.shape) for t in mine] == [tuple(t.shape) for t in theirs]
    for a, b in zip(mine, theirs, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(_as_bytes(a), _as_bytes(b))
    reference = dequantize_experts(weight_format, *stored)
    for a, b in zip(ours.dequantized(), reference, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)
    assert ours.nbytes == sum(t.numel() * t.element_size() for t in theirs)


def test_float_experts_stay_as_they_are_in_the_activations_dtype():
    gate_up, down = _experts()
    same = store_experts("float", gate_up, down, torch.float32)
    assert same.gate_up.data_ptr() == gate_up.data_ptr() and same.scales == ()
    assert store_experts("float", gate_up, down, torch.bfloat16).down.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown expert format 'int4'"):
        store_experts("int4", gate_up, down, torch.float32)
    assert isinstance(same, StoredExperts)
