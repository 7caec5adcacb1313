"""TensorRT engine building (`dllm-trt build`, `lint-trt`, `plan`). Nothing here imports tensorrt at import time.

stage.py             run(BuildOptions) -> BuildResult: the verb; plan (dry run), then build the one step engine
                     into a directory renamed into place, judged against its graph
memory_plan.py       run(PlanOptions) -> MemoryPlan: weights, KV cache, activations per GPU, before any export
lint.py              run(LintOptions) -> LintReport: the real parser's verdict, or the support table's;
                     interface, manifest and profile checks
parser_verdict.py    lint-trt's verdict from the installed library's own parser and builder
gpu_presets.py       the one table of GPU presets (capability, memory, library, profile sizes)
profiles.py          optimization-profile ranges: preset defaults, --profile overrides, one profile or one per phase
support.py           TensorRT's ONNX operator support per version, from trt_support.json (sources inside)
plugins.py           dllm-trt's plugin registry (what lint accepts, what build registers)
trt_library.py       TensorRT and TensorRT for RTX behind one adapter
moe_plugin.py        DllmMoE, the IPluginV3 both parsers import: compiled kernels in, CUDA-driver launches out
triton_aot.py        Triton -> cubins for the plugin, refusing what its launch cannot provide
cuda_launch.py       the plugin's launches through cuda-bindings
gpu.py, build_info.py  the GPU this process sees; what the engine was built with, checked on load
engine.py            TensorRT itself: parse into a strongly typed network, build with profiles, read the layers
"""
