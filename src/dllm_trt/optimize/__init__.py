"""`dllm-trt optimize`: exported graphs in, fused graphs for one target and precision out.

stage.py          run(OptimizeOptions) -> OptimizeResult: the verb
pipeline.py       the one ordered list of passes
fusion_census.py  every fusing pass counted against the model's census; each miss with its rule's reason
context.py        what every pass is told (target, precision, graph, model facts)
upcast.py         a bf16/fp16 export seen in fp32, so that the fusions match it
static_reshape.py head counts written into the exporter's view(..., -1, head_dim)
rms_norm.py, rotary.py, attention.py, moe.py   the fusions, each a pattern/check/rewrite rule
sampling_head.py  the sampler's per-step work inside the step graph, over its rows
quantize.py       fp8/nvfp4 expert and projection weights, stored quantized (kernels/quantization.py)
precision.py      fp16/bf16 with fp32 kept where the reference keeps it
report.py         fusion_report.json / .md
vision.py         which passes act on the vision graphs, and with which function
vision_fusions.py the vision tower's 2-D RoPE and attention fusions
"""

from dllm_trt.optimize.stage import OptimizeOptions, OptimizeResult, run

__all__ = ["OptimizeOptions", "OptimizeResult", "run"]
