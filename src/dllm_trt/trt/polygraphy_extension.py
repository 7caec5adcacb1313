"""dllm-trt as a Polygraphy extension: stock `polygraphy` commands load the DllmMoE plugin with no user code.

Polygraphy 0.53.6 loads plugins two ways only (read in its source): `--plugins PATH` opens a shared
library (`LoadPlugins`: ctypes.CDLL), and extension modules: every entry point of the group
`polygraphy.run.plugins`, a function returning argument groups, is called by `Run.get_subscriptions_impl`
(polygraphy/tools/run/run.py). Polygraphy's `main` sets up the parser of every tool it has on every
command (polygraphy/tools/_main.py), so `run`, `convert` and `inspect` all call the entry point, before any
of them imports TensorRT (Polygraphy imports it lazily, at first use). `arg_groups` registers the DllmMoE
creator there with the TensorRT library Polygraphy will use (`tensorrt`, or `tensorrt_rtx` under
`POLYGRAPHY_USE_TENSORRT_RTX=1`, the same classes and registry as `tensorrt_rtx_bindings`) and adds no
options; pyproject.toml declares the entry point, so installing dllm-trt is all a user does.

What a bare `import tensorrt_rtx` lacks, and the registration supplies first: TensorRT for RTX's ONNX
parser dlopens the unversioned `libtensorrt_rtx.so`, which its wheel does not ship, when it creates a
plugin; without it the process aborts ("terminate called without an active exception") right after the
first `create_plugin` returns. Measured with a toy IPluginV3 on a copy of the wheels without the link,
through Polygraphy's `NetworkFromOnnxPath` and the raw parser alike; with the link both build, as
`dllm-trt build` always did (`trt_library.make_parser_loadable` makes it before the import).

Building (`polygraphy convert`, or `run MODEL.onnx --trt`): the plugin stores kernels compiled for the
build's target, which a plugin cannot ask the builder. It takes the target Polygraphy parsed from the
command line (`convert --compute-capabilities 12.1`, one capability), else the GPU this process sees
(TensorRT proper builds on it), and fails the build naming what to pass when there is neither.
Running an engine needs no target: its kernels are inside it.
"""

from __future__ import annotations

ENTRY_POINT_GROUP = "polygraphy.run.plugins"  # polygraphy.tools.run.run.PLUGIN_ENTRY_POINT


def arg_groups() -> list:
    """The entry point Polygraphy calls: registers dllm-trt's plugins, adds no argument groups."""
    register_for_polygraphy()
    return []


def register_for_polygraphy() -> str | None:
    """Register DllmMoE with the library Polygraphy is configured for; its name, or None where it is not installed."""
    from polygraphy import config

    from dllm_trt.trt.trt_library import TENSORRT, TENSORRT_RTX, installed, load_library

    name = TENSORRT_RTX if config.USE_TENSORRT_RTX else TENSORRT
    if not installed(name):
        return None  # `polygraphy run --onnxrt` where no TensorRT is installed: nothing to prepare, nothing imported
    from dllm_trt.trt.moe_plugin import register_moe_plugin

    register_moe_plugin(load_library(name).trt, resolve_arch=build_target)
    return name


def build_target() -> int | None:
    """The build's target as the plugin's kernels name it (121 for sm_121): Polygraphy's parsed
    `--compute-capabilities` (convert only), else the GPU this process sees, else None."""
    from polygraphy.tools.registry import TOOL_REGISTRY

    for tool in TOOL_REGISTRY:  # only the tool running has parsed its arguments
        for group in tool.arg_groups.values():
            capabilities = getattr(group, "compute_capabilities", None)
            if not capabilities:
                continue
            if len(capabilities) != 1:
                raise RuntimeError(
                    f"DllmMoE stores kernels for one target; --compute-capabilities names {len(capabilities)}: "
                    "build one engine per target"
                )
            major, minor = capabilities[0]
            return 10 * major + minor
    from dllm_trt.trt.gpu import detect_gpu

    gpu = detect_gpu()
    return None if gpu is None else 10 * gpu.compute_capability[0] + gpu.compute_capability[1]
