"""Custom GPU kernels (Triton) and the quantization arithmetic. Every module here imports without Triton installed.

moe_triton.py    the routed-MoE Triton kernels and `fused_moe`, their torch entry point
moe_launches.py  the kernels' launch plan (specs, grids, workspace), shared with the TensorRT plugin
attention_triton.py    attention that never writes its scores (head 512): the torch oracle, the Triton kernels
attention_launches.py  their launch plan (specs, grids, key splits, workspace), shared with the TensorRT plugin
quantization.py  fp8 and nvfp4 weight quantization, both ways (numpy: what optimize stores)
expert_formats.py the experts in the kernels' formats, made with torch on their device (bit-identical)
"""
