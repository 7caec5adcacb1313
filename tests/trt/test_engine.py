"""trt.engine's builder config, on a real TensorRT-for-RTX builder (ahead of time, no GPU needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

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
