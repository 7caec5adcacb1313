"""The one adapter between dllm-trt and the two TensorRT libraries that build its engines.

TensorRT (10.14+/11, module `tensorrt`) builds for the GPU it runs on: H100/H200, B200/GB300, A100.
TensorRT for RTX (1.7+, module `tensorrt_rtx_bindings`) builds ahead of time for a compute
capability named in the builder config, with no GPU present: DGX Spark (SM121), RTX Blackwell
(SM120), Ada (SM89), Ampere RTX (SM86). Both expose the same network, parser, builder and plugin
API, so everything above this module is written once; what differs is here: how the module is
imported, how a build names its target, and what runs where.

The TensorRT-for-RTX wheel ships `libtensorrt_rtx.so.1` but its ONNX parser dlopens the unversioned
`libtensorrt_rtx.so` when it meets a plugin node (and aborts the process if that fails, which no
Python code can catch). `load_library` makes the name resolve before the module is imported: a
relative symlink beside the library, or, where site-packages is read-only, a per-user folder of
links from which the parser is preloaded (its RPATH `$ORIGIN` then points there).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from dllm_trt.errors import DllmError

TENSORRT, TENSORRT_RTX = "tensorrt", "tensorrt-rtx"
LIBRARIES = (TENSORRT, TENSORRT_RTX)
_MODULES = {TENSORRT: "tensorrt", TENSORRT_RTX: "tensorrt_rtx_bindings"}
DISPLAY = {TENSORRT: "TensorRT", TENSORRT_RTX: "TensorRT for RTX"}
_INSTALL = {
    TENSORRT: "pip install 'dllm-trt[trt]' where NVIDIA's package index is reachable",
    TENSORRT_RTX: "pip install 'dllm-trt[rtx]' (TensorRT for RTX, from PyPI)",
}


@dataclass(frozen=True)
class TrtLibrary:
    name: str  # TENSORRT | TENSORRT_RTX
    trt: ModuleType
    version: str

    @property
    def ahead_of_time(self) -> bool:
        """Builds for a named compute capability without the GPU (TensorRT for RTX)."""
        return self.name == TENSORRT_RTX

    @property
    def captures_graphs(self) -> bool:
        """Its runtime captures and replays CUDA graphs itself (TensorRT for RTX, RTX_RUNTIME): not by hand."""
        return self.name == TENSORRT_RTX

    def configure_target(self, config: object, compute_capability: tuple[int, int]) -> None:
        """Name the build's target GPU in the builder config (TensorRT builds for the GPU it runs on)."""
        if not self.ahead_of_time:
            return
        major, minor = compute_capability
        member = getattr(self.trt.ComputeCapability, f"SM{major}{minor}", None)
        if member is None:
            raise DllmError(f"TensorRT for RTX {self.version} cannot target sm_{major}{minor}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(member, 0)


# TensorRT for RTX's runtime settings (IRuntimeConfig attribute -> (enum, member), names as its Python bindings
# spell them): it captures each shape's CUDA graph itself, once that shape's specialised kernels are compiled
# (LAZY: compiled in the background, fallback kernels meanwhile). A graph captured by hand would keep the
# fallback kernels, and torch's global capture mode forbids the background compiler's CUDA calls.
RTX_RUNTIME = {
    "cuda_graph_strategy": ("CudaGraphStrategy", "WHOLE_GRAPH_CAPTURE"),
    "dynamic_shapes_kernel_specialization_strategy": ("DynamicShapesKernelSpecializationStrategy", "LAZY"),
}
RTX_NO_GRAPHS = dict(RTX_RUNTIME, cuda_graph_strategy=("CudaGraphStrategy", "DISABLED"))


def runtime_settings(lib: TrtLibrary, cuda_graphs: bool) -> dict[str, object]:
    """IRuntimeConfig attribute -> value for an execution context of `lib` (empty for TensorRT, which has no
    graph strategy: dllm-trt captures its enqueue itself, generation.tensorrt_step)."""
    if not lib.ahead_of_time:
        return {}
    table = RTX_RUNTIME if cuda_graphs else RTX_NO_GRAPHS
    return {attribute: getattr(getattr(lib.trt, enum), member) for attribute, (enum, member) in table.items()}


def execution_context(lib: TrtLibrary, engine: object, cuda_graphs: bool) -> object:
    """An execution context whose activations the caller provides (set_device_memory), with the library's
    runtime settings; through IRuntimeConfig where the library has it (TensorRT for RTX, TensorRT 10.11+)."""
    trt = lib.trt
    user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    if not hasattr(engine, "create_runtime_config"):
        return engine.create_execution_context(user_managed)
    config = engine.create_runtime_config()
    config.set_execution_context_allocation_strategy(user_managed)
    for attribute, value in runtime_settings(lib, cuda_graphs).items():
        setattr(config, attribute, value)
    return engine.create_execution_context(config)


def installed(name: str) -> bool:
    return importlib.util.find_spec(_MODULES[name]) is not None


def load_library(name: str) -> TrtLibrary:
    """Import a TensorRT library (loadable first, for TensorRT for RTX); one line when it is missing."""
    if name not in LIBRARIES:
        raise DllmError(f"unknown TensorRT library '{name}'; one of: {', '.join(LIBRARIES)}")
    if not installed(name):
        raise DllmError(f"{name} is not installed: {_INSTALL[name]}")
    if name == TENSORRT_RTX:
        make_parser_loadable()
    trt = __import__(_MODULES[name])
    return TrtLibrary(name, trt, trt.__version__)


def _libs_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        raise DllmError(f"tensorrt-rtx-cu13-libs is not installed: {_INSTALL[TENSORRT_RTX]}")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def make_parser_loadable() -> str:
    """Make `libtensorrt_rtx.so` resolvable for the RTX parser; returns how ("present", "link", "farm:DIR")."""
    libs = _libs_dir()
    link = libs / "libtensorrt_rtx.so"
    if link.exists():
        return "present"
    try:
        os.symlink("libtensorrt_rtx.so.1", link)  # relative: survives a moved virtual environment
        return "link"
    except FileExistsError:
        return "present"  # another process made it
    except OSError:
        pass  # read-only site-packages
    if "tensorrt_rtx_bindings" in sys.modules or "tensorrt_rtx_libs" in sys.modules:
        raise DllmError(
            f"{libs} is read-only and TensorRT for RTX was imported before dllm-trt could make its parser "
            "loadable; start Python with LD_LIBRARY_PATH pointing at a folder holding a libtensorrt_rtx.so link"
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    farm = cache / "dllm-trt" / f"tensorrt-rtx-libs-{(libs / 'libtensorrt_rtx.so.1').stat().st_ino}"
    farm.mkdir(parents=True, exist_ok=True)
    for alias, target in (
        ("libtensorrt_rtx.so", "libtensorrt_rtx.so.1"),
        ("libtensorrt_rtx.so.1", "libtensorrt_rtx.so.1"),
        ("libtensorrt_onnxparser_rtx.so.1", "libtensorrt_onnxparser_rtx.so.1"),
    ):
        if not (farm / alias).is_symlink():
            try:
                os.symlink(libs / target, farm / alias)
            except FileExistsError:
                pass
    # Loaded from the farm, the parser's RPATH $ORIGIN is the farm, where the unversioned name resolves
    # to the very library already loaded; the wheel's own later load of the same files reuses these.
    ctypes.CDLL(str(farm / "libtensorrt_rtx.so.1"), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(farm / "libtensorrt_onnxparser_rtx.so.1"), mode=ctypes.RTLD_GLOBAL)
    return f"farm:{farm}"
