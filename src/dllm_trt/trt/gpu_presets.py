"""Per-GPU build presets: the one table of what each supported GPU is, which library builds for it,
and what an engine for it defaults to.

Two libraries build engines (trt.trt_library). TensorRT builds for the GPU it runs on, so an
H100/H200/B200/GB300/A100 engine is built on that GPU. TensorRT for RTX builds ahead of time for a
named compute capability on any machine, GPU or not: DGX Spark (SM121), RTX Blackwell (SM120), Ada
(SM89), Ampere RTX (SM86). A preset whose library is not installed, or whose GPU must be present
and is not, is refused in one line.

Profile sizes are the default optimization-profile ranges (`--profile` overrides them), sized for
the released 26B-A4B model where the memory allows: the KV cache of a full layer costs 20 KB per
position and row in bf16 (5 full layers x 2 KV heads x 512 x K and V x 2 B); the sliding layers
are capped at `sliding_window - 1` positions.

An engine's precision is its graphs' own (TensorRT builds strongly typed networks), chosen by
`optimize --precision`; a preset lists the graph precisions its GPU runs (bf16 needs SM80 or newer).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.errors import DllmError
from dllm_trt.trt.trt_library import TENSORRT, TENSORRT_RTX


@dataclass(frozen=True)
class GpuPreset:
    name: str
    description: str
    name_patterns: tuple[str, ...]  # substrings (case-insensitive) of the CUDA device name
    compute_capability: tuple[int, int]
    memory_gib: int
    library: str  # trt_library.TENSORRT (builds on the GPU) | TENSORRT_RTX (ahead of time, anywhere)
    batch: tuple[int, int, int]  # default profile (min, opt, max)
    new_tokens_max: int  # longest encoder chunk (the prompt); opt is the canvas length
    context: tuple[int, int]  # cache_full (opt, max): positions in the KV cache
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")  # graph precisions (optimize --precision) it runs

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    @property
    def arch(self) -> int:
        """The compute capability as Triton and the plugin's kernels name it (121 for sm_121)."""
        major, minor = self.compute_capability
        return 10 * major + minor

    @property
    def needs_gpu(self) -> bool:
        return self.library == TENSORRT


_HOPPER, _BLACKWELL = (1, 1, 8), (1, 4, 32)
# Quantized graphs (optimize.quantize): fp8 needs FP8 tensors (SM89 and newer); nvfp4 adds FP4 tensors,
# which TensorRT for RTX 1.7 builds for SM120/SM121 only (for SM89: "Cannot compile for target(s) sm89,
# because the model contains HW-specific datatypes: fp4_e2m1"). On Hopper the plugin's kernels dequantize
# nvfp4 in the kernel, no FP4 instruction needed; TensorRT proper has never built such a graph here.
_FP8, _NVFP4 = ("fp32", "fp16", "bf16", "fp8"), ("fp32", "fp16", "bf16", "fp8", "nvfp4")
# fmt: off
PRESETS: dict[str, GpuPreset] = {p.name: p for p in (
    GpuPreset("h100", "NVIDIA H100 (Hopper, 80 GB HBM3)", ("H100",), (9, 0), 80, TENSORRT,
              _HOPPER, 4096, (2048, 32768), _NVFP4),
    GpuPreset("h200", "NVIDIA H200 (Hopper, 141 GB HBM3e)", ("H200",), (9, 0), 141, TENSORRT,
              (1, 2, 16), 8192, (4096, 65536), _NVFP4),
    GpuPreset("b200", "NVIDIA B200 (Blackwell, 180 GB HBM3e)", ("B200",), (10, 0), 180, TENSORRT,
              _BLACKWELL, 8192, (4096, 131072), _NVFP4),
    GpuPreset("gb300", "NVIDIA GB300 (Blackwell Ultra, 288 GB HBM3e)", ("GB300", "B300"), (10, 3), 288, TENSORRT,
              (1, 4, 64), 8192, (4096, 131072), _NVFP4),
    GpuPreset("a100", "NVIDIA A100 (Ampere, 80 GB HBM2e)", ("A100",), (8, 0), 80, TENSORRT,
              _HOPPER, 4096, (2048, 32768)),
    GpuPreset("dgx-spark", "NVIDIA DGX Spark (GB10, 128 GB unified LPDDR5x)", ("GB10",), (12, 1), 128, TENSORRT_RTX,
              (1, 1, 4), 4096, (2048, 32768), _NVFP4),
    GpuPreset("rtx-pro-6000", "NVIDIA RTX PRO 6000 Blackwell (96 GB GDDR7)", ("RTX PRO 6000",), (12, 0), 96,
              TENSORRT_RTX, (1, 1, 8), 4096, (2048, 32768), _NVFP4),
    GpuPreset("rtx-5090", "NVIDIA GeForce RTX 5090 (Blackwell, 32 GB GDDR7)", ("RTX 5090",), (12, 0), 32,
              TENSORRT_RTX, (1, 1, 2), 2048, (2048, 8192), _NVFP4),
    GpuPreset("l40s", "NVIDIA L40S (Ada, 48 GB GDDR6)", ("L40S",), (8, 9), 48, TENSORRT_RTX,
              (1, 1, 4), 4096, (2048, 16384), _FP8),
    GpuPreset("rtx-4090", "NVIDIA GeForce RTX 4090 (Ada, 24 GB GDDR6X)", ("RTX 4090",), (8, 9), 24, TENSORRT_RTX,
              (1, 1, 2), 2048, (2048, 8192), _FP8),
    GpuPreset("rtx-a6000", "NVIDIA RTX A6000 (Ampere, 48 GB GDDR6)", ("RTX A6000",), (8, 6), 48, TENSORRT_RTX,
              (1, 1, 4), 4096, (2048, 16384)),
    GpuPreset("rtx-3090", "NVIDIA GeForce RTX 3090 (Ampere, 24 GB GDDR6X)", ("RTX 3090",), (8, 6), 24, TENSORRT_RTX,
              (1, 1, 2), 2048, (2048, 8192)),
)}
# fmt: on


def get_preset(name: str) -> GpuPreset:
    if name not in PRESETS:
        raise DllmError(f"unknown GPU preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_precision(preset: GpuPreset, precision: str) -> None:
    """Refuse, before any work, graphs in a precision the preset's GPU cannot run."""
    if precision not in preset.precisions:
        why = {"fp8": " (FP8 tensors need sm_89 or newer)",
               "nvfp4": " (FP4 tensors: TensorRT for RTX builds them for sm_120/sm_121 only)"}  # fmt: skip
        raise DllmError(
            f"{preset.description} ({preset.sm}) cannot run {precision} graphs{why.get(precision, '')}; optimize "
            f"for one of: {', '.join(preset.precisions)}"
        )


def matches(preset: GpuPreset, device_name: str, capability: tuple[int, int]) -> bool:
    """Whether a detected GPU is the one the preset targets (capability decides; the name must agree)."""
    named = any(pattern.lower() in device_name.lower() for pattern in preset.name_patterns)
    return tuple(capability) == preset.compute_capability and named
