"""Per-GPU build presets: the one table of what each supported GPU is and what an engine for it defaults to.

Profile sizes are the default optimization-profile ranges (`--profile` overrides them). They are
sized for the released 26B-A4B model: one engine's bf16 weights are about 50 GB, and the KV cache
of a full layer costs 20 KB per position and row (5 full layers x 2 KV heads x 512 x K and V x 2 B)
while the sliding layers are capped at `sliding_window - 1` positions.

Default precision is bf16 everywhere: 90% of the parameters are expert weights consumed by the
dllm_trt MoE plugins, whose Triton kernels take fp32/fp16/bf16 weights only, so fp8/nvfp4 Q/DQ
reach only the attention and dense-MLP GEMMs (see engines.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.errors import DllmError

PRECISIONS = ("bf16", "fp8", "nvfp4")


@dataclass(frozen=True)
class GpuPreset:
    name: str
    description: str
    name_patterns: tuple[str, ...]  # substrings (case-insensitive) of the CUDA device name
    compute_capability: tuple[int, int]
    memory_gib: int
    default_precision: str
    precisions: tuple[str, ...]  # what the tensor cores of this GPU can run
    batch: tuple[int, int, int]  # default profile (min, opt, max)
    new_tokens_max: int  # longest encoder chunk (the prompt); opt is the canvas length
    context: tuple[int, int]  # cache_full (opt, max): positions in the KV cache

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


# fmt: off
PRESETS: dict[str, GpuPreset] = {p.name: p for p in (
    GpuPreset("h100", "NVIDIA H100 (Hopper, 80 GB HBM3)", ("H100",), (9, 0), 80, "bf16",
              ("bf16", "fp8"), (1, 1, 8), 4096, (2048, 32768)),
    GpuPreset("h200", "NVIDIA H200 (Hopper, 141 GB HBM3e)", ("H200",), (9, 0), 141, "bf16",
              ("bf16", "fp8"), (1, 2, 16), 8192, (4096, 65536)),
    GpuPreset("dgx-spark", "NVIDIA DGX Spark (GB10, 128 GB unified LPDDR5x)", ("GB10",), (12, 1), 128, "bf16",
              ("bf16", "fp8", "nvfp4"), (1, 1, 4), 4096, (2048, 32768)),
    GpuPreset("b200", "NVIDIA B200 (Blackwell, 180 GB HBM3e)", ("B200",), (10, 0), 180, "bf16",
              ("bf16", "fp8", "nvfp4"), (1, 4, 32), 8192, (4096, 131072)),
    GpuPreset("gb300", "NVIDIA GB300 (Blackwell Ultra, 288 GB HBM3e)", ("GB300", "B300"), (10, 3), 288, "bf16",
              ("bf16", "fp8", "nvfp4"), (1, 4, 64), 8192, (4096, 131072)),
)}
# fmt: on


def get_preset(name: str) -> GpuPreset:
    if name not in PRESETS:
        raise DllmError(f"unknown GPU preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_precision(preset: GpuPreset, precision: str | None) -> str:
    """`None` means the preset's default; a precision the GPU cannot run is refused here, before any work."""
    precision = precision or preset.default_precision
    if precision not in PRECISIONS:
        raise DllmError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if precision not in preset.precisions:
        raise DllmError(
            f"{preset.description} ({preset.sm}) has no {precision} tensor cores; choose one of: "
            f"{', '.join(preset.precisions)}"
        )
    return precision


def matches(preset: GpuPreset, device_name: str, capability: tuple[int, int]) -> bool:
    """Whether a detected GPU is the one the preset targets (capability decides; the name must agree)."""
    named = any(pattern.lower() in device_name.lower() for pattern in preset.name_patterns)
    return tuple(capability) == preset.compute_capability and named
