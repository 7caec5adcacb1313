"""TensorRT for RTX builds of the fp8 and nvfp4 graphs (tiny preset) with the MoE plugin's quantized
experts inside, ahead of time on this CPU; and where the builder refuses them (FP4 below sm_120).

Bytes of the `small` preset against bf16 are measured by bench/bench_build_engines.py (too slow for
a test on 2 cores); here the tiny preset shows what is stored: the FP8 / FP4 bytes themselves.
"""

import onnx
import pytest

from dllm_trt.engines.stage import BuildOptions, build_engines, plan_build
from dllm_trt.errors import DllmError
from dllm_trt.trt import engine as trt_engine
from dllm_trt.trt.moe_plugin import kernels_in_engine, register_moe_plugin
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed, load_library

needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


@pytest.fixture(scope="module")
def tiny_quantized(tiny_trt):
    return tiny_trt


def _probe(raw: bytes) -> bytes:
    """A 32-byte window from the middle of a tensor's stored bytes."""
    return raw[len(raw) // 2 : len(raw) // 2 + 32]


@needs_rtx
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_dgx_spark_builds_quantized_experts_into_the_plugin(tiny_quantized, precision, tmp_path):
    info = build_engines(BuildOptions(tiny_quantized[precision], tmp_path / "e", "dgx-spark", quiet=True))[1]
    step = info["engines"]["step"]
    assert info["precision"] == precision and step["network"]["plugins"] == {"DllmMoE": 2}
    blob = (tmp_path / "e" / "step.engine").read_bytes()
    stored = kernels_in_engine(blob)
    assert stored and all(s["shape"]["weight_format"] == precision for s in stored)
    graph = onnx.load(str(tiny_quantized[precision] / "step.onnx")).graph
    moe = [n for n in graph.node if n.op_type == "DllmMoE"]
    inits = {i.name: i for i in graph.initializer}
    for node in moe:  # the quantized expert bytes are in the engine as the graph stores them (FP4 packed)
        for name in node.input[3:5]:
            assert blob.count(_probe(inits[name].raw_data)) >= 1, name
    # every projection runs as one fused fp8 weight-only GEMM: DequantizeLinear and the Cast fused into it
    layers = (tmp_path / "e" / "step.layers.txt").read_text().splitlines()
    fused = [line for line in layers if "CastMulCastFc" in line and "Datatype: FP8" in line]
    assert len(fused) == sum(n.op_type == "DequantizeLinear" for n in graph.node) == 16
    print(f"{precision} dgx-spark: {step['bytes']} B in {step['seconds']} s, {len(fused)} fp8 GEMMs")


@needs_rtx
def test_fp8_builds_for_sm89_where_fp4_is_refused(tiny_quantized, tmp_path):
    info = build_engines(BuildOptions(tiny_quantized["fp8"], tmp_path / "e", "rtx-4090", quiet=True))[1]
    assert info["engines"]["step"]["network"]["plugins"] == {"DllmMoE": 2}
    with pytest.raises(DllmError, match=r"RTX 4090 .*\(sm_89\) cannot run nvfp4 graphs \(FP4 tensors"):
        plan_build(BuildOptions(tiny_quantized["nvfp4"], tmp_path / "n", "rtx-4090"))
    with pytest.raises(DllmError, match=r"\(sm_86\) cannot run fp8 graphs \(FP8 tensors need sm_89 or newer\)"):
        plan_build(BuildOptions(tiny_quantized["fp8"], tmp_path / "n", "rtx-3090"))
    # why the preset refuses: TensorRT for RTX's own builder, asked anyway, fails on the FP4 tensors
    lib = load_library(TENSORRT_RTX)
    register_moe_plugin(lib.trt, arch=89)
    parsed = trt_engine.parse_network(lib, tiny_quantized["nvfp4"] / "step.onnx")
    profiles = plan_build(BuildOptions(tiny_quantized["nvfp4"], tmp_path / "n", "dgx-spark"))["graphs"]["step"]
    with pytest.raises(DllmError, match="HW-specific datatypes: fp4_e2m1") as refused:
        trt_engine.build_serialized(lib, parsed, list(profiles["profiles"].values()), (8, 9), 3, None)
    print(f"builder, nvfp4 for sm_89: {refused.value}")
