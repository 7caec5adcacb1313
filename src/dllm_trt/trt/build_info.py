"""build_info.json: what an engine directory was built with, and the check a runtime makes before loading it.

A serialized TensorRT engine runs only on the TensorRT version that built it and on GPUs of the
compute capability it was built for, so both are recorded and compared on load.
"""

from __future__ import annotations

import json
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.trt.gpu import GpuInfo
from dllm_trt.trt.trt_library import DISPLAY, TENSORRT

BUILD_INFO = "build_info.json"


def write_build_info(directory: Path, info: dict) -> None:
    (directory / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_build_info(directory: Path) -> dict:
    path = directory / BUILD_INFO
    if not path.is_file():
        raise DllmError(f"{directory} has no {BUILD_INFO}; pass a directory written by 'dllm-trt build'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DllmError(f"{path} is not valid JSON ({exc}); re-run dllm-trt build") from None


def check_compatible(info: dict, trt_version: str, gpu: GpuInfo | None) -> None:
    """Refuse, in one line, engines built by another TensorRT version or for another GPU."""
    built = info.get("tensorrt_version")
    library = DISPLAY.get(info.get("library", TENSORRT), info.get("library"))
    if built != trt_version:
        raise DllmError(
            f"the engines were built with {library} {built}, this process has {library} {trt_version}; "
            "rebuild them with 'dllm-trt build' (engines are not portable across TensorRT versions)"
        )
    want = info.get("gpu", {})
    if gpu is None:
        raise DllmError(f"no CUDA GPU visible; the engines need a {want.get('name')} ({_sm(want)})")
    if list(gpu.compute_capability) != list(want.get("compute_capability", [])):
        raise DllmError(
            f"the engines were built for {want.get('name')} ({_sm(want)}); this GPU is {gpu.name} ({gpu.sm}); "
            f"rebuild with 'dllm-trt build --gpu ...' on this machine"
        )


def _sm(gpu: dict) -> str:
    cap = gpu.get("compute_capability") or ["?", "?"]
    return f"sm_{cap[0]}{cap[1]}"
