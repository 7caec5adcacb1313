"""The Triton MoE kernels with quantized experts (fp8, nvfp4), dequantized inside the kernel, under
TRITON_INTERPRET=1 against the CPU stand-in's semantics: moe_reference over the dequantized experts."""

import importlib
import os

import numpy as np
import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

from dllm_trt.contract import MOE_INPUTS  # noqa: E402
from dllm_trt.generation.cpu_standins import dllm_moe_standin  # noqa: E402
from dllm_trt.kernels.quantization import dequantize_experts, unpack_fp4  # noqa: E402

mt = importlib.reload(importlib.import_module("dllm_trt.kernels.moe_triton"))

# multiples of 16 along both input axes (NVFP4 blocks), nothing a power of two beyond that
HIDDEN, EXPERTS, WIDTH, TOP_K = 48, 6, 32, 2


def _case(weight_format, n_tokens, seed=0):
    """(kernel args, stored numpy tensors in contract order) for random experts quantized to the format."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, HIDDEN, generator=gen)
    logits = torch.randn(n_tokens, EXPERTS, generator=gen) * 2.0
    scale = torch.rand(EXPERTS, generator=gen) + 0.5
    gate_up = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=gen) / HIDDEN**0.5).numpy()
    down = (torch.randn(EXPERTS, HIDDEN, WIDTH, generator=gen) / WIDTH**0.5).numpy()
    # a spread of channel magnitudes, so per-channel and per-block scales differ
    gate_up *= np.linspace(0.2, 3.0, 2 * WIDTH, dtype=np.float32)[None, :, None]
    tensors, stored = mt.quantized_experts(weight_format, gate_up, down)
    return (hidden, logits, scale, *tensors[:2]), tensors[2:], stored


def _reference(args, weight_format, stored):
    gate_up, down = dequantize_experts(weight_format, *stored)
    hidden, logits, scale = args[:3]
    return mt.moe_reference(hidden, logits, scale, torch.from_numpy(gate_up), torch.from_numpy(down), TOP_K)


@pytest.mark.parametrize("bm", [None, 64])
@pytest.mark.parametrize("n_tokens", [1, 9])
@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_kernels_dequantize_as_the_standin_does(weight_format, n_tokens, bm):
    args, scales, stored = _case(weight_format, n_tokens)
    ref = _reference(args, weight_format, stored)
    out = mt.fused_moe(*args, TOP_K, bm=bm, weight_format=weight_format, scales=scales)
    err = (out - ref).abs().max().item()
    print(f"\n[{weight_format} N={n_tokens} bm={bm}] max abs err {err:.3e} (max |ref| {ref.abs().max().item():.2f})")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # the CPU stand-in (what onnxruntime runs for the graph's node) computes the same function
    standin = dllm_moe_standin(*(a.numpy() for a in args[:3]), *stored, top_k=TOP_K, activation="gelu_tanh",
                               weight_format=weight_format)  # fmt: skip
    np.testing.assert_allclose(standin, ref.numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_bf16_activations_with_quantized_experts(weight_format):
    args, scales, stored = _case(weight_format, 9, seed=1)
    args = (args[0].bfloat16(), *args[1:])
    ref = _reference(args, weight_format, stored)
    out = mt.fused_moe(*args, TOP_K, weight_format=weight_format, scales=scales)
    assert out.dtype == torch.bfloat16
    print(f"\n[{weight_format} bf16] max abs err {(out.float() - ref.float()).abs().max().item():.3e}")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_one_experts_scales_off_by_two_change_its_tokens_only(weight_format):
    """The kernels read each expert's own scales: doubling expert 0's down scale (fp8: its channel
    scales; nvfp4: its global scale, as a block scale of 448 has no double in e4m3) doubles its share."""
    args, scales, stored = _case(weight_format, 16, seed=2)
    out = mt.fused_moe(*args, TOP_K, weight_format=weight_format, scales=scales)
    index = {"fp8": 1, "nvfp4": 3}[weight_format]  # down_scale [E, H] / down_global_scale [E]
    bad = list(scales)
    bad[index] = scales[index].clone()
    bad[index][0] *= 2.0
    corrupted = mt.fused_moe(*args, TOP_K, weight_format=weight_format, scales=tuple(bad))
    bad_stored = list(stored)
    bad_stored[2 + index] = bad[index].numpy()
    torch.testing.assert_close(corrupted, _reference(args, weight_format, bad_stored), atol=2e-5, rtol=1e-4)
    routed = (torch.topk(args[1], TOP_K, dim=-1).indices == 0).any(-1)
    assert routed.any() and not routed.all()
    assert torch.equal(corrupted[~routed], out[~routed])
    assert (corrupted[routed] - out[routed]).abs().max() > 1e-2


def test_wrong_stored_dtypes_and_shapes_are_refused():
    args, scales, _ = _case("fp8", 3)
    with pytest.raises(ValueError, match="fp8 expert weights are torch.float8_e4m3fn"):
        mt.fused_moe(*args[:3], args[3].float(), args[4].float(), TOP_K, weight_format="fp8", scales=scales)
    with pytest.raises(ValueError, match="gate_up_scale has shape"):
        mt.fused_moe(*args, TOP_K, weight_format="fp8", scales=(scales[0][:, :-1], scales[1]))
    with pytest.raises(ValueError, match="takes"):
        mt.fused_moe(*args, TOP_K, weight_format="nvfp4", scales=scales)


@pytest.mark.parametrize("weight_format", ["fp8", "nvfp4"])
def test_quantized_experts_hand_the_kernels_the_stored_values(weight_format):
    """What fused_moe is given (bench_moe_kernel and these tests) holds exactly the graph's stored tensors."""
    gen = np.random.default_rng(3)
    experts = (
        gen.standard_normal((EXPERTS, 2 * WIDTH, HIDDEN), np.float32),
        gen.standard_normal((EXPERTS, HIDDEN, WIDTH), np.float32),
    )
    tensors, stored = mt.quantized_experts(weight_format, *experts)
    assert len(tensors) == len(stored) == len(MOE_INPUTS[weight_format]) - 3
    for tensor, array in zip(tensors, stored, strict=True):
        if weight_format == "nvfp4" and array.dtype.itemsize == 1 and array.shape[-1] == 2 * tensor.shape[-1]:
            np.testing.assert_array_equal(unpack_fp4(tensor.numpy()).view(np.uint8), array.view(np.uint8))
        elif tensor.dtype == torch.float8_e4m3fn:
            np.testing.assert_array_equal(tensor.view(torch.uint8).numpy(), array.view(np.uint8))
        else:
            np.testing.assert_array_equal(tensor.numpy(), array)
    with pytest.raises(ValueError, match="fp8 or nvfp4"):
        mt.quantized_experts("float", *experts)
