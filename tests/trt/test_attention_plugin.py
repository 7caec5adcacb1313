"""The dllm_trt::DllmAttention plugin: its enqueue without TensorRT, and real engines that carry its kernels.

`launch_attention` (what enqueue runs) is run here with each launch interpreted by Triton on the CPU
tensors its addresses point into: the key split, the workspace carve and the argument order are checked
against the reference attention. TensorRT for RTX builds a one-node engine ahead of time (no GPU) whose
plugin compiles and stores the kernels for its target. On a CUDA GPU the compiled kernels run through
the driver (skipped where there is none).
"""

from __future__ import annotations

import base64
import importlib
import os
import subprocess
import sys
import tempfile
import textwrap

import onnx
import pytest
import torch
from interpreted_launch import InterpretedLaunch
from onnx import TensorProto, helper

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

from dllm_trt.kernels import attention_launches  # noqa: E402
from dllm_trt.kernels.attention_launches import AttentionShape, kernel_specs, workspace_layout  # noqa: E402
from dllm_trt.models.diffusion_gemma import attention_bias  # noqa: E402
from dllm_trt.trt.attention_plugin import graph_shapes, kernels_in_engine, launch_attention  # noqa: E402
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed  # noqa: E402

at = importlib.reload(importlib.import_module("dllm_trt.kernels.attention_triton"))
needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ONNX_TYPES = {"fp32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16}


def _node_inputs(dtype: str, batch: int, q_heads: int, kv_heads: int, queries: int, cached: int, head_dim: int,
                 device: str = "cpu") -> list[torch.Tensor]:  # fmt: skip
    gen = torch.Generator().manual_seed(queries + cached)
    keys = queries + cached
    valid = torch.rand(batch, keys, generator=gen) > 0.2
    tensors = [
        torch.randn(batch, q_heads, queries, head_dim, generator=gen),
        torch.randn(batch, kv_heads, keys, head_dim, generator=gen),
        torch.randn(batch, kv_heads, keys, head_dim, generator=gen),
        attention_bias(valid, queries, True, None, torch.float32).expand(batch, 1, queries, keys).contiguous(),
    ]
    return [t.to(DTYPES[dtype]).to(device) for t in tensors]


@pytest.mark.parametrize("split", [True, False], ids=["keys split", "one pass"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_launch_attention_carves_the_workspace_and_feeds_the_kernels(dtype, split, monkeypatch):
    if not split:
        monkeypatch.setattr(attention_launches, "TARGET_PROGRAMS", 1)
    batch, queries, keys = 2, 6, 6 + 40
    inputs = _node_inputs(dtype, batch, 4, 2, queries, 40, 32)
    shape = AttentionShape(dtype, 4, 2, 32)
    out = torch.full_like(inputs[0], float("nan"))
    size = workspace_layout(shape, batch, queries, keys)[1]
    assert (size > 0) == split and size <= attention_launches.workspace_bytes(shape)
    workspace = torch.full((max(size, 1),), 0xFF, dtype=torch.uint8)  # garbage, not zeros
    owners = [*inputs, out, workspace]
    kernels = {stage: InterpretedLaunch(spec, owners) for stage, spec in kernel_specs(shape, upcast=True).items()}
    launch_attention(kernels, shape, [t.data_ptr() for t in inputs], out.data_ptr(), workspace.data_ptr(),
                     batch, queries, keys, 0)  # fmt: skip
    used = {stage for stage, k in kernels.items() if k.calls}
    assert used == ({"attend_split", "combine"} if split else {"attend"})
    ref = at.attention_reference(*(t.float() for t in inputs))
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"\n[{dtype}, {'split' if split else 'one pass'}] launch_attention max rel err {err:.2e}")
    assert err <= (1e-5 if dtype == "fp32" else 1e-2)


def test_launch_attention_refuses_a_wrong_input_count_and_skips_empty_calls():
    shape = AttentionShape("bf16", 16, 2, 512)
    with pytest.raises(ValueError, match="takes 4 inputs, got 3"):
        launch_attention({}, shape, [1, 2, 3], 0, 0, 1, 4, 4, 0)
    launch_attention({}, shape, [1, 2, 3, 4], 0, 0, 1, 0, 4, 0)  # no queries: no kernel is looked up


def attention_graph(dtype: str, q_heads: int, kv_heads: int, head_dim: int, scale: float = 1.0) -> onnx.ModelProto:
    t = ONNX_TYPES[dtype]
    shapes = dict(query=["b", q_heads, "t", head_dim], key=["b", kv_heads, "s", head_dim],
                  value=["b", kv_heads, "s", head_dim], bias=["b", 1, "t", "s"])  # fmt: skip
    node = helper.make_node(
        "DllmAttention", list(shapes), ["out"], name="attention", domain="dllm_trt", scale=scale,
        plugin_namespace="dllm_trt", plugin_version="1",
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "attention", [helper.make_tensor_value_info(n, t, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("out", t, ["b", q_heads, "t", head_dim])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("dllm_trt", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def test_the_shapes_to_compile_are_read_from_the_graph():
    assert graph_shapes(attention_graph("bf16", 16, 2, 512, 0.5)) == {AttentionShape("bf16", 16, 2, 512, 0.5)}


def _build(model: onnx.ModelProto, sm: tuple[int, int]) -> bytes:
    """The engine, built in a child process (a builder crash must not take the test run with it)."""
    code = f"""
        import sys, onnx
        from dllm_trt.trt.trt_library import load_library
        from dllm_trt.trt.attention_plugin import register_attention_plugin
        lib = load_library("tensorrt-rtx"); trt = lib.trt
        register_attention_plugin(trt, arch={sm[0] * 10 + sm[1]})
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger); network = builder.create_network(0); parser = trt.OnnxParser(network, logger)
        assert parser.parse(open(sys.argv[1], "rb").read()), parser.get_error(0).desc()
        config = builder.create_builder_config(); lib.configure_target(config, {sm})
        profile = builder.create_optimization_profile()
        for name in ("query", "key", "value", "bias"):
            dims = network.get_input([network.get_input(i).name for i in range(network.num_inputs)].index(name)).shape
            rows = lambda n: (1, 8, 256)[n] if name in ("query", "bias") else (1, 64, 4096)[n]
            keys = lambda n: (1, 64, 4096)[n]
            shape = lambda n: [(1, 1, 2)[n], dims[1], rows(n), keys(n) if name == "bias" else dims[3]]
            profile.set_shape(name, shape(0), shape(1), shape(2))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            sys.exit(3)
        open(sys.argv[2], "wb").write(bytes(engine))
    """
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/m.onnx")
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), f"{tmp}/m.onnx", f"{tmp}/e"],
                                capture_output=True, text=True, timeout=300,
                                env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return open(f"{tmp}/e", "rb").read()


@needs_rtx
@pytest.mark.parametrize("dtype, heads, sm", [("bf16", (16, 2, 512), (12, 1))])
def test_the_engine_carries_the_kernels_compiled_for_its_target(dtype, heads, sm):
    engine = _build(attention_graph(dtype, *heads), sm)
    sets = kernels_in_engine(engine)
    assert sets and all(s == sets[0] for s in sets)
    stored = sets[0]
    arch = sm[0] * 10 + sm[1]
    shape = AttentionShape(**stored["shape"])
    assert shape == AttentionShape(dtype, *heads)
    specs = kernel_specs(shape)
    assert set(stored["kernels"]) == set(specs) == {"attend", "attend_split", "combine"}
    for stage, kernel in stored["kernels"].items():
        cubin = base64.b64decode(kernel["cubin"])
        assert cubin[:4] == b"\x7fELF" and kernel["name"].encode() in cubin and kernel["arch"] == arch
        assert kernel["shared_mem"] <= 48 * 1024  # what a launch gets without opting in
        own = tuple("ptr" if kind.startswith("*") else "i32" for _, kind in specs[stage].signature)
        assert tuple(kernel["params"][: len(own)]) == own  # the launcher's argument order is the plan's
    print(f"{dtype} sm_{arch}: engine {len(engine)} B, shared memory "
          f"{ {s: k['shared_mem'] for s, k in stored['kernels'].items()} }")  # fmt: skip


def test_a_plugin_without_kernels_refuses_to_run():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX is not installed (the rtx extra)")
    from dllm_trt.trt.attention_plugin import plugin_classes
    from dllm_trt.trt.trt_library import load_library

    plugin_class, _ = plugin_classes(load_library(TENSORRT_RTX).trt)
    with pytest.raises(RuntimeError, match="carries no compiled kernels"):
        plugin_class(1.0, arch=None, ptx_version=None).enqueue([], [], [], [], 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the driver launch of compiled kernels)")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_kernels_launched_through_the_driver_match_the_reference(dtype):
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed")
    from dllm_trt.trt.attention_plugin import kernels_for
    from dllm_trt.trt.cuda_launch import LoadedKernel

    batch, queries, cached = 2, 64, 1000
    inputs = _node_inputs(dtype, batch, 16, 2, queries, cached, 512, device="cuda")
    shape = AttentionShape(dtype, 16, 2, 512)
    major, minor = torch.cuda.get_device_capability()
    kernels = {stage: LoadedKernel(k) for stage, k in kernels_for(shape, major * 10 + minor).items()}
    out = torch.full_like(inputs[0], float("nan"))
    workspace = torch.empty(attention_launches.workspace_bytes(shape), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    launch_attention(kernels, shape, [t.data_ptr() for t in inputs], out.data_ptr(), workspace.data_ptr(), batch,
                     queries, queries + cached, stream)  # fmt: skip
    torch.cuda.synchronize()
    ref = at.attention_reference(*(t.float() for t in inputs))
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"\n[{dtype} sm_{major}{minor}] driver launch max rel err {err:.2e}")
    assert err <= (1e-5 if dtype == "fp32" else 1e-2)
