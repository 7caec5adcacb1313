"""TensorRT engine building (`dllm-trt build`, `dllm-trt lint-trt`). Nothing here imports tensorrt at import time.

stage.py             run(BuildOptions) -> BuildResult: the verb; plan (dry run), then build into a
                     directory renamed into place
lint.py              run(LintOptions) -> LintReport: ops, dtypes, attributes, plugins, static shapes,
                     manifest, profiles
gpu_presets.py       the one table of GPU presets (capability, memory, precisions, profile sizes)
profiles.py          optimization-profile ranges: preset defaults, --profile overrides, consistency
support.py           TensorRT's ONNX operator support per version, from trt_support.json (sources inside)
plugins.py           dllm-trt's plugin registry (what lint accepts, what build registers)
moe_plugin.py        what TensorRT's AOT plugins can express; the compiled-kernel record
moe_chain_plugin.py  the four single-kernel MoE plugins DllmMoE is lowered into
triton_aot.py        Triton -> PTX for an AOT plugin, refusing what its launch cannot provide
rewrite.py           the graph passes applied just before parsing (MoE lowering, attention fallback)
gpu.py, build_info.py  the GPU this process sees; what engines were built with, checked on load
engine.py            TensorRT itself: parse into a strongly typed network, build with polygraphy
"""
