"""The MoE chain plugins: AOT kernels compile with TensorRT's argument layout; TensorRT tests skip without it."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from dllm_trt.engines import moe_chain_plugin as chain

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRT = "TensorRT is not installed here (its wheels download from NVIDIA's index, unreachable)"


def test_specs_put_arguments_in_tensorrt_order_and_tactics_pick_the_tile():
    # TensorRT passes (input pointers..., int32 extras..., output pointers...)
    for spec in (chain.route_spec(128, 8), chain.bucket_spec(8), chain.up_spec("bf16", 128, 2816, 704, 8, 16),
                 chain.down_spec("bf16", 128, 2816, 704, 16)):  # fmt: skip
        kinds = ["ptr" if t.startswith("*") else t for _, t in spec.signature]
        first_scalar = kinds.index("i32")
        assert kinds == ["ptr"] * first_scalar + ["i32"] + ["ptr"] * (len(kinds) - first_scalar - 1), spec.kernel
    assert chain.tile_for_tactic(64) == 64 and chain.tile_for_tactic(None) == 16 and chain.tile_for_tactic(7) == 16
    assert chain.up_grid(256, 128, 704, 16, chain._icdiv) == (16, 11, 128)
    assert chain.down_grid(256, 128, 2816, 16, chain._icdiv) == (16, 22, 128)


def _entry_params(ptx: str, name: str) -> list[str]:
    header = ptx[ptx.index(f".entry {name}(") : ptx.index(")", ptx.index(f".entry {name}("))]
    return ["ptr" if ".ptr" in line else line.split()[1] for line in re.findall(r"\.param [^,\n]+", header)]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'dllm-trt[triton]')")
def test_chain_kernels_compile_to_sm90_ptx_with_the_trt_layout_within_48kb():
    code = """
        import json
        from triton.backends.compiler import GPUTarget
        from dllm_trt.engines import moe_chain_plugin as c
        from dllm_trt.engines.triton_aot import compile_spec
        target = GPUTarget("cuda", 90, 32)
        specs = [c.route_spec(128, 8), c.bucket_spec(8), c.up_spec("bf16", 128, 2816, 704, 8, 64),
                 c.down_spec("bf16", 128, 2816, 704, 64)]
        out = []
        for s in specs:
            k = compile_spec(s, target=target)
            out.append(dict(name=k.name, ptx=k.ptx, smem=k.shared_mem, n=len(s.signature)))
        print(json.dumps(out))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    for kernel in json.loads(result.stdout.strip().splitlines()[-1]):
        params = _entry_params(kernel["ptx"], kernel["name"])
        assert params[: kernel["n"]].count(".u32") == 1  # one int32 extra: n_tokens
        assert all(p == "ptr" for p in params[kernel["n"] :])  # then only Triton's (null) scratch pointers
        assert kernel["smem"] <= 48 * 1024


# ---- needs TensorRT (never run on the machines this was written on) ------------------------------


def test_chain_plugins_register_with_tensorrt():
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    chain.register_chain_plugins()
    chain.register_chain_plugins()  # idempotent
    for op in chain.CHAIN_OPS:
        assert trt.get_plugin_registry().get_creator(op, "1", "dllm_trt") is not None


def test_an_engine_of_the_lowered_chain_matches_the_reference(tmp_path):
    trt = pytest.importorskip("tensorrt", reason=NO_TRT)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import onnx
    from onnx import TensorProto, helper

    from dllm_trt.engines.engine import build_serialized, parse_network
    from dllm_trt.engines.plugins import register_all
    from dllm_trt.engines.rewrite import lower_moe
    from dllm_trt.kernels.moe_triton import moe_reference

    register_all()
    n, h, e, i, k = 37, 96, 16, 48, 4
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    scale = torch.rand(e, generator=gen) + 0.5
    inits = [onnx.numpy_helper.from_array(t.numpy(), name) for name, t in
             (("gate_up_proj", gate_up), ("down_proj", down), ("per_expert_scale", scale))]  # fmt: skip
    node = helper.make_node("DllmMoE", ["hidden", "router_logits", "per_expert_scale", "gate_up_proj", "down_proj"],
                            ["out"], domain="dllm_trt", top_k=k, activation="gelu_tanh",
                            plugin_namespace="dllm_trt", plugin_version="1")  # fmt: skip
    graph = helper.make_graph([node], "moe", [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", h]),
        helper.make_tensor_value_info("router_logits", TensorProto.FLOAT, ["n", e])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", h])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("dllm_trt", 1)])
    assert lower_moe(model) == 1
    path = tmp_path / "moe.onnx"
    onnx.save(model, str(path))
    network = parse_network(model.SerializeToString(), path)
    shapes = {"hidden": ([1, h], [n, h], [64, h]), "router_logits": ([1, e], [n, e], [64, e])}
    serialized = build_serialized(network, shapes, tmp_path / "timing.cache", 3)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    hidden, logits = torch.randn(n, h, generator=gen).cuda(), torch.randn(n, e, generator=gen).cuda()
    out = torch.empty(n, h, device="cuda")
    for name, tensor in (("hidden", hidden), ("router_logits", logits)):
        assert context.set_input_shape(name, tuple(tensor.shape))
        assert context.set_tensor_address(name, tensor.data_ptr())
    assert context.set_tensor_address("out", out.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    ref = moe_reference(hidden, logits, scale.cuda(), gate_up.cuda(), down.cuda(), k)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
