"""The dllm_trt::DllmMoE TensorRT plugin: what is checkable without TensorRT, and the TensorRT tests.

Without TensorRT: the module imports (and imports neither tensorrt nor triton), registration
fails with a clear error, and the AOT kernel compiles to sm_90 PTX with the argument layout
TensorRT's AOT launch passes. The tests that need TensorRT (and a GPU) skip with the reason.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRT = "TensorRT is not installed here (its wheels download from NVIDIA's index, unreachable)"


def _run_python(code: str, timeout: int = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def test_import_pulls_in_neither_tensorrt_nor_triton():
    loaded = json.loads(
        _run_python(
            """
            import json, sys
            import dllm_trt.engines.moe_plugin as plugin
            assert plugin.PLUGIN_ID == "dllm_trt::DllmMoE"
            print(json.dumps({name: name in sys.modules for name in ("tensorrt", "triton")}))
            """
        )
    )
    assert loaded == {"tensorrt": False, "triton": False}


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed, so the missing-TensorRT error cannot occur")
def test_register_without_tensorrt_raises_clear_error():
    from dllm_trt.engines.moe_plugin import register_moe_plugin

    with pytest.raises(RuntimeError, match=r"^TensorRT is not installed: "):
        register_moe_plugin()


def test_trt_dtype_names_map_to_triton_types():
    from dllm_trt.engines.moe_plugin import triton_dtype

    assert [triton_dtype(n) for n in ("FLOAT", "HALF", "BF16")] == ["fp32", "fp16", "bf16"]
    with pytest.raises(ValueError, match="INT8"):
        triton_dtype("INT8")


def _entry_params(ptx: str, name: str) -> list[str]:
    header = ptx[ptx.index(f".entry {name}(") : ptx.index(")", ptx.index(f".entry {name}("))]
    return ["ptr" if ".ptr" in line else line.split()[1] for line in re.findall(r"\.param [^,\n]+", header)]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'dllm-trt[triton]')")
def test_aot_kernel_compiles_to_sm90_ptx_with_the_trt_argument_layout():
    info = json.loads(
        _run_python(
            """
            import json
            from triton.backends.compiler import GPUTarget
            from dllm_trt.engines.moe_plugin import compile_single_launch
            out = {}
            for dtype in ("bf16", "fp32"):
                k = compile_single_launch(dtype, 128, 2816, 704, 8, target=GPUTarget("cuda", 90, 32))
                out[dtype] = {"name": k.name, "ptx": k.ptx, "warps": k.num_warps, "smem": k.shared_mem,
                              "blocks": dict(k.blocks)}
            print(json.dumps(out))
            """,
            timeout=300,
        )
    )
    for dtype, kernel in info.items():
        params = _entry_params(kernel["ptx"], kernel["name"])
        print(f"\n[{dtype}] {kernel['name']}: params {params}, {kernel['warps']} warps, "
              f"{kernel['smem']} B shared, tiles {kernel['blocks']}")  # fmt: skip
        # 5 input pointers, one int32 extra (n_tokens), 1 output pointer, then Triton's scratch pointers
        assert params[:7] == ["ptr"] * 5 + [".u32", "ptr"]
        assert all(p == "ptr" for p in params[7:])
        assert f".reqntid {kernel['warps'] * 32}" in kernel["ptx"]
        assert kernel["smem"] <= 48 * 1024


# ---- needs TensorRT (never run on the machines this was written on) ------------------------------


def _trt():
    return pytest.importorskip("tensorrt", reason=NO_TRT)


def test_registers_with_tensorrt():
    trt = _trt()
    from dllm_trt.engines.moe_plugin import register_moe_plugin

    register_moe_plugin()
    register_moe_plugin()  # idempotent
    assert trt.get_plugin_registry().get_creator("DllmMoE", "1", "dllm_trt") is not None


def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


def _tiny_inputs(torch, n_tokens=37, hidden=96, experts=16, width=48):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "hidden": torch.randn(n_tokens, hidden, generator=gen),
        "router_logits": torch.randn(n_tokens, experts, generator=gen),
        "per_expert_scale": torch.rand(experts, generator=gen) + 0.5,
        "gate_up_proj": torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5,
        "down_proj": torch.randn(experts, hidden, width, generator=gen) / width**0.5,
    }
    return {name: t.cuda() for name, t in tensors.items()}


def _run_engine(trt, torch, serialized, inputs, out_shape):
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    out = torch.empty(out_shape, device="cuda")
    for name, tensor in inputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    context.set_tensor_address("out", out.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return out


def test_engine_with_the_plugin_matches_the_reference():
    trt = _trt()
    torch = _cuda_torch()
    import tensorrt.plugin as trtp

    from dllm_trt.engines.moe_plugin import register_moe_plugin
    from dllm_trt.kernels.moe_triton import moe_reference

    register_moe_plugin()
    inputs = _tiny_inputs(torch)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    tensors = [network.add_input(n, trt.float32, tuple(t.shape)) for n, t in inputs.items()]
    layer = network.add_plugin(trtp.op.dllm_trt.DllmMoE(*tensors, top_k=4, activation="gelu_tanh"), aot=True)
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    serialized = builder.build_serialized_network(network, builder.create_builder_config())
    assert serialized is not None
    out = _run_engine(trt, torch, serialized, inputs, inputs["hidden"].shape)
    ref = moe_reference(*inputs.values(), 4)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_onnx_dllm_moe_node_parses_to_the_plugin():
    trt = _trt()
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from dllm_trt.engines.moe_plugin import register_moe_plugin

    register_moe_plugin()
    n, h, e, i = 8, 96, 16, 48
    shapes = {
        "hidden": [n, h], "router_logits": [n, e], "per_expert_scale": [e],
        "gate_up_proj": [e, 2 * i, h], "down_proj": [e, h, i],
    }  # fmt: skip
    node = helper.make_node(
        "DllmMoE", list(shapes), ["out"], domain="dllm_trt",
        top_k=4, activation="gelu_tanh", plugin_namespace="dllm_trt", plugin_version="1",
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "moe",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [n, h])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("dllm_trt", 1)]
    )
    onnx.checker.check_model(model)
    logger = trt.Logger(trt.Logger.WARNING)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [
        parser.get_error(k).desc() for k in range(parser.num_errors)
    ]
    assert network.num_layers == 1
    assert network.get_layer(0).type == trt.LayerType.PLUGIN_V3
