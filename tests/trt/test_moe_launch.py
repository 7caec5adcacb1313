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


def _activations(dtype: str, n_tokens: int, seed: int) -> list[torch.Tensor]:
    """hidden [N, H], router logits [N, E], per-expert scale [E]: the node's per-call inputs."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n_tokens, H, generator=gen).to(DTYPES[dtype]), torch.randn(n_tokens, E, generator=gen) * 2,
            torch.rand(E, generator=gen) + 0.5]  # fmt: skip


def _experts(weight_format: str, dtype: str, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(the experts as the node takes them, from gate_up on; the float experts they stand for)."""
    gen = torch.Generator().manual_seed(seed + 7)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
    down = torch.randn(E, H, I, generator=gen) / I**0.5
    if weight_format == "float":
        experts = (gate_up.to(DTYPES[dtype]), down.to(DTYPES[dtype]))
        return experts, experts
    experts, stored = mt.quantized_experts(weight_format, gate_up.numpy(), down.numpy())
    return experts, tuple(torch.from_numpy(w) for w in dequantize_experts(weight_format, *stored))


def _reference(activations: list[torch.Tensor], float_experts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return mt.moe_reference(*[t.cpu() for t in activations], *float_experts, K).float()


def _node(weight_format: str, dtype: str, n_tokens: int, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The node's inputs (contract.MOE_INPUTS order) and its reference output, computed in fp32."""
    activations = _activations(dtype, n_tokens, n_tokens)
    experts, reference = _experts(weight_format, dtype, n_tokens)
    return [t.to(device) for t in (*activations, *experts)], _reference(activations, reference)


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


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the driver launch inside a CUDA-graph capture)"
)
@pytest.mark.parametrize("mode", ["global", "thread_local"])
@pytest.mark.parametrize("weight_format,dtype", CASES)
def test_the_plugin_launch_path_replays_from_a_cuda_graph_with_new_inputs(weight_format, dtype, mode):
    """What an engine's enqueue does inside a CUDA graph (TensorRT's own capture, or a runtime's): the kernels
    loaded before the capture, launch_moe captured on a non-default stream in `mode`, replayed with new
    activations copied into the captured buffers, at 1 token and at the profile's maximum (the workspace is
    sized for it), each replay against moe_reference."""
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed")
    from dllm_trt.generation import cuda_graphs
    from dllm_trt.trt.cuda_launch import LoadedKernel
    from dllm_trt.trt.moe_plugin import kernels_for

    max_tokens = 256
    experts, float_experts = _experts(weight_format, dtype, 0)
    experts = [t.to("cuda") for t in experts]  # the engine's constant experts
    shape = mt.moe_shape(_activations(dtype, 1, 0)[0], experts[0], K, weight_format)
    bm = tile_m(16, shape)  # fixed at build time from the profile's opt, whatever the call's token count
    major, minor = torch.cuda.get_device_capability()
    kernels = {stage: LoadedKernel(k) for stage, k in kernels_for(shape, bm, major * 10 + minor).items()}
    workspace = torch.empty(workspace_layout(shape, max_tokens)[1], dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    for n_tokens in (1, max_tokens):
        static = [t.to("cuda") for t in _activations(dtype, n_tokens, 0)]  # per call: activations, logits, scales
        out = torch.full_like(static[0], float("nan"))

        def launch(static=static, out=out, n_tokens=n_tokens):  # noqa: ANN001, ANN202
            pointers = [t.data_ptr() for t in (*static, *experts)]
            launch_moe(kernels, shape, bm, pointers, out.data_ptr(), workspace.data_ptr(), n_tokens,
                       torch.cuda.current_stream().cuda_stream)  # fmt: skip

        cuda_graphs.run_on(stream, launch)  # eager, on the stream the capture uses
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float().cpu(), _reference(static, float_experts), atol=2e-2, rtol=2e-2)
        graph = cuda_graphs.capture(launch, stream, mode)
        for seed in (1, 2):
            fresh = _activations(dtype, n_tokens, seed)
            for buffer, value in zip(static, fresh):
                buffer.copy_(value)
            out.fill_(float("nan"))
            cuda_graphs.replay(graph, stream)
            torch.cuda.synchronize()
            ref = _reference(fresh, float_experts)
            err = (out.float().cpu() - ref).abs().max().item()
            print(f"\n[{weight_format} {dtype} {mode} N={n_tokens} replay {seed}] max abs err {err:.2e}")
            tol = 1e-4 if dtype == "fp32" else 2e-2
            torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
