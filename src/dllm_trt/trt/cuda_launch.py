"""Launch kernels compiled by trt.triton_aot through the CUDA driver, on a given stream.

What the MoE plugin's enqueue calls inside an engine, and what a GPU check calls directly with torch
tensors' pointers on a GPU that has no TensorRT (tests/trt/test_moe_launch.py). Thin on purpose:
load the cubin into the current context, look its entry up, launch with the arguments as the cubin
declares them (pointers, int32; Triton's trailing scratch pointers get null). Needs cuda-bindings
and an NVIDIA driver; it has never run on the machines this was written on (no GPU there).
"""

from __future__ import annotations

import ctypes

from dllm_trt.trt.triton_aot import CompiledKernel


def _driver():  # noqa: ANN202
    try:
        from cuda.bindings import driver
    except ImportError:
        raise RuntimeError(
            "launching the MoE plugin's kernels needs cuda-bindings (pip install cuda-bindings)"
        ) from None
    return driver


def _check(driver, result: tuple, what: str) -> object:  # noqa: ANN001
    err, *value = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return value[0] if value else None


def current_arch() -> int | None:
    """The compute capability (90 for sm_90) of the CUDA context current on this thread, or None when there
    is none (no driver, no GPU, no context): where the plugin may load its kernels ahead of its first enqueue."""
    try:
        driver = _driver()
        context = _check(driver, driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(context):
            return None
        device = _check(driver, driver.cuCtxGetDevice(), "cuCtxGetDevice")
        attribute = driver.CUdevice_attribute
        major = _check(driver, driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                                           device), "cuDeviceGetAttribute")  # fmt: skip
        minor = _check(driver, driver.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                                           device), "cuDeviceGetAttribute")  # fmt: skip
        return int(major) * 10 + int(minor)
    except Exception:  # noqa: BLE001 (no driver library, no device: not a GPU build)
        return None


def stream_is_capturing(stream: int) -> bool:
    """Whether `stream` is being captured into a CUDA graph: a module must not be loaded then (in global and
    thread-local capture modes the driver refuses such calls, or invalidates the capture)."""
    driver = _driver()
    status = _check(driver, driver.cuStreamIsCapturing(driver.CUstream(stream)), "cuStreamIsCapturing")
    return status != driver.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE


class LoadedKernel:
    """One compiled kernel loaded into the current CUDA context."""

    def __init__(self, kernel: CompiledKernel) -> None:
        driver = _driver()
        self.kernel = kernel
        self.module = _check(driver, driver.cuModuleLoadData(kernel.cubin), f"cuModuleLoadData({kernel.name})")
        self.function = _check(
            driver, driver.cuModuleGetFunction(self.module, kernel.name.encode()), "cuModuleGetFunction"
        )

    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int) -> None:
        """`args`: the kernel's own parameters (device pointers as ints, int32 scalars), in order."""
        driver = _driver()
        params = self.kernel.params
        if len(args) > len(params):
            raise ValueError(f"{self.kernel.name} takes {len(params)} parameters, got {len(args)}")
        values = list(args) + [0] * (len(params) - len(args))  # Triton's scratch pointers: null
        types = tuple(ctypes.c_void_p if kind == "ptr" else ctypes.c_int32 for kind in params)
        result = driver.cuLaunchKernel(
            self.function,
            *grid,
            32 * self.kernel.num_warps,
            1,
            1,
            self.kernel.shared_mem,
            driver.CUstream(stream),
            (tuple(values), types),
            0,
        )
        _check(driver, result, f"cuLaunchKernel({self.kernel.name})")
