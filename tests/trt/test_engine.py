"""trt.engine on a real TensorRT-for-RTX builder (ahead of time, no GPU needed): the builder config it makes,
and whether TensorRT fuses an attention, asked rather than assumed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.trt.support import fuses_attention
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed, load_library

needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


def _matmul_graph(path) -> None:  # noqa: ANN001
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [weight],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), path)


@needs_rtx
def test_rtx_engines_require_user_allocation_so_they_can_be_captured(tmp_path):
    from dllm_trt.trt import engine
    from dllm_trt.trt.trt_library import load_library

    lib = load_library(TENSORRT_RTX)
    _matmul_graph(tmp_path / "mm.onnx")
    parsed = engine.parse_network(lib, tmp_path / "mm.onnx")
    profiles = [{"x": ([1, 16], [4, 16], [8, 16])}]
    config = engine.builder_config(lib, parsed[0], profiles, (12, 1), 3)
    assert config.get_flag(lib.trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    assert not config.get_flag(lib.trt.BuilderFlag.WEIGHT_STREAMING)  # a flag we do not set reads False
    serialized, _ = engine.build_serialized(lib, parsed, profiles, (12, 1), 3, None)
    assert len(serialized) > 1000  # the builder accepts the flag for this target and builds


@needs_rtx
@pytest.mark.parametrize(
    "dtype, head_size, q_heads, kv_heads",
    [("BF16", 256, 16, 8), ("BF16", 512, 16, 2), ("FP16", 512, 16, 16)],
    ids=["released sliding layers", "released full layers", "head 512 without grouping"],
)
def test_the_builder_fuses_exactly_what_the_support_table_says(dtype, head_size, q_heads, kv_heads):
    """The released model's full layers (head 512) get no fused kernel from TensorRT for RTX: the reason
    optimize routes them to the DllmAttention plugin (trt.attention_plugin). Asked ahead of time for sm_121."""
    from dllm_trt.trt.engine import probe_fused_attention

    fused = probe_fused_attention(load_library(TENSORRT_RTX), dtype, head_size, q_heads, kv_heads, (12, 1))
    print(f"\nTensorRT for RTX, sm_121, {dtype} head {head_size} ({q_heads}:{kv_heads}): fused {fused}")
    assert fused is fuses_attention(dtype, head_size, "rtx-1.7")
