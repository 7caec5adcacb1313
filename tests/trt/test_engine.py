"""trt.engine against the real builder: whether TensorRT fuses an attention is asked, not assumed."""

import pytest

from dllm_trt.trt.support import fuses_attention
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed, load_library

needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


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
