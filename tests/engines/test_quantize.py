"""fp8 through nvidia-modelopt's ONNX quantizer where it can run; nvfp4 and plugin graphs refused with the reason."""

import numpy as np
import onnx
import pytest
import trt_graphs as graphs
from onnx import TensorProto, helper

from dllm_trt.engines.quantize import fp8_parity, modelopt_available, quantize_fp8, synthetic_feeds, unsupported_reason
from dllm_trt.errors import DllmError


def _block(path, hidden=64, ffn=128):
    """An fp32 transformer-ish block onnxruntime CPU can run: RMSNorm, two GEMMs, a residual."""
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array((rng.standard_normal((hidden, ffn)) / 8).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array((rng.standard_normal((ffn, hidden)) / 8).astype(np.float32), "w2")
    scale = onnx.numpy_helper.from_array(np.ones(hidden, np.float32), "scale")
    nodes = [
        helper.make_node("RMSNormalization", ["x", "scale"], ["n"], name="norm", axis=-1),
        helper.make_node("MatMul", ["n", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["d"], name="down"),
        helper.make_node("Add", ["x", "d"], ["y"], name="residual"),
    ]
    io = dict(inputs=[dict(name="x", dtype="float32", shape=["batch", 32, hidden])])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32, hidden])
    graph = helper.make_graph(nodes, "block", [x], [y], [w1, w2, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return io


def test_nvfp4_plugin_graphs_and_bf16_graphs_are_refused_with_the_reason():
    assert "no nvfp4 mode" in unsupported_reason(graphs.denoiser(), "nvfp4")
    reason = unsupported_reason(graphs.denoiser(), "fp8")
    assert "DllmMoE" in reason and "fp8 MoE kernels" in reason
    bf16 = helper.make_model(
        helper.make_graph([], "g", [], [], [helper.make_tensor("w", TensorProto.BFLOAT16, [1], [1.0])])
    )
    assert "no CPU bf16 MatMul" in unsupported_reason(bf16, "fp8")


@pytest.mark.skipif(not modelopt_available(), reason="nvidia-modelopt (ONNX extras) is not installed")
def test_fp8_qdq_on_cpu_and_its_parity_on_onnxruntime(tmp_path):
    io = _block(tmp_path / "block.onnx")
    feeds = synthetic_feeds(io, {"batch": 2}, vocab=64)
    quantize_fp8(tmp_path / "block.onnx", tmp_path / "q32.onnx", feeds, high_precision="fp32")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q32.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 2
    parity = fp8_parity(tmp_path / "block.onnx", tmp_path / "q32.onnx", feeds)
    print(f"\nfp8 Q/DQ vs fp32 on onnxruntime CPU: {parity}")
    assert 0 < parity["y"]["max_rel"] < 0.1  # fp8 e4m3 keeps 3 mantissa bits
    quantize_fp8(tmp_path / "block.onnx", tmp_path / "qbf16.onnx", feeds)  # what build uses: bf16 around the Q/DQ
    model = onnx.load(str(tmp_path / "qbf16.onnx"))
    assert any(t.data_type == TensorProto.BFLOAT16 for t in model.graph.initializer) or any(
        n.op_type == "Cast" for n in model.graph.node
    )
    assert not list((tmp_path).glob("*modelopt*"))  # its scratch copy is gone, the source dir untouched


def test_quantize_refuses_a_plugin_graph_before_touching_modelopt(tmp_path):
    onnx.save(graphs.denoiser(), str(tmp_path / "denoiser.onnx"))
    with pytest.raises(DllmError, match="--precision fp8: denoiser.onnx: the graph has custom ops"):
        quantize_fp8(tmp_path / "denoiser.onnx", tmp_path / "q.onnx", {})
