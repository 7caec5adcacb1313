"""`dllm-trt optimize`: exported graphs in, fused graphs for one target and precision out.

    stage.py          run(OptimizeOptions) -> OptimizeResult: the verb
    pipeline.py       the one ordered list of passes
    context.py        what every pass is told (target, precision, graph, model facts)
    rms_norm.py, rotary.py, attention.py, moe.py   the fusions, each a pattern/check/rewrite rule
    sampling_head.py  the sampler's per-step work inside the denoiser graph
    precision.py      fp16/bf16 with fp32 kept where the reference keeps it
    report.py         fusion_report.json / .md
"""

from dllm_trt.optimize.stage import OptimizeOptions, OptimizeResult, run

__all__ = ["OptimizeOptions", "OptimizeResult", "run"]
