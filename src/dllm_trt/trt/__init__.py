"""TensorRT and TensorRT for RTX plumbing, shared by `build`, `lint-trt`, `plan` and the tensorrt Step.

A leaf library. Nothing here imports tensorrt at import time.

trt_library.py   TensorRT and TensorRT for RTX behind one adapter
engine.py        TensorRT itself: parse into a strongly typed network, build with profiles, read the layers
gpu_presets.py   the one table of GPU presets (capability, memory, library, profile sizes)
gpu.py           the GPU this process sees
build_info.py    what an engine was built with, checked on load
profiles.py      optimization-profile ranges: preset defaults, overrides, one profile or one per phase
support.py       TensorRT's ONNX operator support per version, from trt_support.json
plugins.py       dllm-trt's plugin registry (what lint accepts, what build registers)
moe_plugin.py    DllmMoE, the IPluginV3 both parsers import: compiled kernels in, CUDA-driver launches out
attention_plugin.py  DllmAttention, attention TensorRT fuses no kernel for (head 512), built and run like DllmMoE
plugin_fields.py the plugins' shared plumbing: field reading, stored kernel sets, object lifetime
triton_aot.py    Triton -> cubins for the plugin, refusing what its launch cannot provide
cuda_launch.py   the plugin's launches through cuda-bindings
polygraphy_extension.py  the entry point that makes stock polygraphy commands register DllmMoE
"""
