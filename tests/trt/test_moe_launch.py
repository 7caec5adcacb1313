"""The MoE plugin's enqueue without TensorRT (trt.moe_plugin.launch_moe): the node's input
addresses, the workspace carved into the launches' intermediates, five launches.

Here, under TRITON_INTERPRET=1, each launch runs the real Triton kernel on the CPU tensors the
addresses belong to, so a wrong offset, an overlap or inputs taken in the wrong order shows up as a
wrong result against moe_reference. On a CUDA GPU (no TensorRT needed) the same function launches the
kernels compiled for that GPU (what the engine stores; compiled in a child process while this one
interprets) through the CUDA driver (trt.cuda_launch) with torch tensors' addresses: skipped where
there is no GPU.
"""

import importlib
import os

import pytest
import torch
from interpreted_launch import InterpretedLaunch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

from dllm_trt.contract import MOE_INPUTS  # noqa: E402
from dllm_trt.kernels.moe_launches import MoEShape, kernel_specs, tile_m, workspace_layout  # noqa: E402
from dllm_trt.kernels.quantization import dequantize_experts  # noqa: E402
from dllm_trt.trt.moe_plugin import launch_moe  # noqa: E402

mt = importlib.reload(importlib.import_module("dllm_trt.kernels.moe_triton"))

E, H, I, K = 6, 48, 32, 2  # noqa: E741  multiples of 16 along both input axes (NVFP4 blocks)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [("float", "fp32"), ("float", "bf16"), ("fp8", "bf16"), ("nvfp4", "bf16")]


def _node(weight_format: str, dtype: str, n_tokens: int, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The node's inputs (contract.MOE_INPUTS order) and its reference output, computed in fp32."""
    gen = torch.Generator().manual_seed(n_tokens)
    hidden = torch.randn(n_tokens, H, generator=gen).to(DTYPES[dtype])
    logits = torch.randn(n_tokens, E, generator=gen) * 2
    scale = torch.rand(E, generator=gen) + 0.5
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    if weight_format == "float":
        experts = (gate_up.to(hidden.dtype), down.to(hidden.dtype))
        reference = experts
    else:
        experts, stored = mt.quantized_experts(weight_format, gate_up.numpy(), down.numpy())
        reference = tuple(torch.from_numpy(w) for w in dequantize_experts(weight_format, *stored))
    ref = mt.moe_reference(hidden, logits, scale, *reference, K).float()
    return [t.to(device) for t in (hidden, logits, scale, *experts)], ref


@pytest.mark.parametrize("n_tokens", [1, 9])
@pytest.mark.parametrize("weight_format,dtype", CASES)
def test_launch_moe_carves_the_workspace_and_feeds_the_kernels(weight_format, dtype, n_tokens):
    inputs, ref = _node(weight_format, dtype, n_tokens, "cpu")
    shape = mt.moe_shape(inputs[0], inputs[3], K, weight_format)
    bm = tile_m(n_tokens, shape)
    out = torch.full_like(inputs[0], float("nan"))
    workspace = torch.full((workspace_layout(shape, n_tokens)[1],), 0xFF, dtype=torch.uint8)  # garbage, not zeros
    owners = [*inputs, out, workspace]
    kernels = {stage: InterpretedLaunch(spec, owners) for stage, spec in kernel_specs(shape, bm, upcast=True).items()}
    launch_moe(kernels, shape, bm, [t.data_ptr() for t in inputs], out.data_ptr(), workspace.data_ptr(), n_tokens, 0)
    assert all(k.calls == 1 for k in kernels.values())
    err = (out.float() - ref).abs().max().item()
    print(f"\n[{weight_format} {dtype} N={n_tokens}] launch_moe max abs err {err:.2e}")
    tol = 1e-5 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_launch_moe_refuses_a_wrong_input_count_and_skips_zero_tokens():
    shape = MoEShape("bf16", E, H, I, K, "nvfp4")
    with pytest.raises(ValueError, match=f"takes {len(MOE_INPUTS['nvfp4'])} inputs, got 5"):
        launch_moe({}, shape, 16, [1] * 5, 0, 0, 4, 0)
    launch_moe({}, shape, 16, [1] * 5, 0, 0, 0, 0)  # nothing to launch: no kernel is looked up


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the driver launch of the compiled kernels)"
)
@pytest.mark.parametrize("weight_format,dtype", CASES)
def test_compiled_kernels_launched_through_the_driver_match_the_reference(weight_format, dtype):
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed")
    from dllm_trt.trt.cuda_launch import LoadedKernel
    from dllm_trt.trt.moe_plugin import kernels_for

    n_tokens = 37
    inputs, ref = _node(weight_format, dtype, n_tokens, "cuda")
    shape = mt.moe_shape(inputs[0], inputs[3], K, weight_format)
    bm = tile_m(n_tokens, shape)
    major, minor = torch.cuda.get_device_capability()
    kernels = {stage: LoadedKernel(k) for stage, k in kernels_for(shape, bm, major * 10 + minor).items()}
    out = torch.full_like(inputs[0], float("nan"))
    workspace = torch.empty(workspace_layout(shape, n_tokens)[1], dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    launch_moe(
        kernels, shape, bm, [t.data_ptr() for t in inputs], out.data_ptr(), workspace.data_ptr(), n_tokens, stream
    )
    torch.cuda.synchronize()
    err = (out.float().cpu() - ref).abs().max().item()
    print(f"\n[{weight_format} {dtype} sm_{major}{minor}] driver launch max abs err {err:.2e}")
    tol = 1e-4 if dtype == "fp32" else 2e-2
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
