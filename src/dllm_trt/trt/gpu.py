"""Which GPU this process sees: name, compute capability, memory; without TensorRT, torch or a GPU if need be."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from dllm_trt.errors import DllmError
from dllm_trt.trt.gpu_presets import PRESETS, GpuPreset, matches


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_gib: float

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def as_dict(self) -> dict:
        return dict(name=self.name, compute_capability=list(self.compute_capability), memory_gib=self.memory_gib)


def detect_gpu() -> GpuInfo | None:
    """GPU 0 as torch sees it, else as nvidia-smi reports it; None when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return GpuInfo(props.name, (props.major, props.minor), round(props.total_memory / 2**30, 1))
    except ImportError:
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"]
    try:
        line = subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
        name, cap, mem = (part.strip() for part in line.split(","))
        major, minor = (int(x) for x in cap.split("."))
        return GpuInfo(name, (major, minor), round(float(mem) / 1024, 1))
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def preset_for(gpu: GpuInfo) -> str | None:
    return next((name for name, preset in PRESETS.items() if matches(preset, gpu.name, gpu.compute_capability)), None)


def check_gpu(preset: GpuPreset, gpu: GpuInfo | None) -> GpuInfo:
    """The build's GPU must be the preset's: a TensorRT engine is built for the GPU it is built on."""
    if gpu is None:
        raise DllmError(
            f"no CUDA GPU visible: --gpu {preset.name} engines must be built on a {preset.description}; "
            "use --dry-run to check the plan without one"
        )
    if not matches(preset, gpu.name, gpu.compute_capability):
        other = preset_for(gpu)
        hint = f"pass --gpu {other}" if other else "no preset matches it"
        raise DllmError(
            f"--gpu {preset.name} expects a {preset.description} ({preset.sm}), but this machine has "
            f"{gpu.name} ({gpu.sm}); {hint}"
        )
    return gpu
