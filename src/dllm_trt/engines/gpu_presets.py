"""Per-GPU build presets: the one table of what each supported GPU is and what an engine for it defaults to.

Profile sizes are the default optimization-profile ranges (`--profile` overrides them). They are
sized for the released 26B-A4B model: one engine's bf16 weights are about 50 GB, and the KV cache
of a full layer costs 20 KB per position and row (5 full layers x 2 KV heads x 512 x K and V x 2 B)
while the sliding layers are capped at `sliding_window - 1` positions.

An engine's precision is its graphs' own (TensorRT builds strongly typed networks), chosen by
`optimize --precision`; a preset lists the graph precisions its GPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.errors import DllmError


@dataclass(frozen=True)
class GpuPreset:
    name: str
    description: str
    name_patterns: tuple[str, ...]  # substrings (case-insensitive) of the CUDA device name
    compute_capability: tuple[int, int]
    memory_gib: int
    precisions: tuple[str, ...]  # graph precisions (optimize --precision) this GPU runs
    batch: tuple[int, int, int]  # default profile (min, opt, max)
    new_tokens_max: int  # longest encoder chunk (the prompt); opt is the canvas length
    context: tuple[int, int]  # cache_full (opt, max): positions in the KV cache

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


# fmt: off
PRESETS: dict[str, GpuPreset] = {p.name: p for p in (
    GpuPreset("h100", "NVIDIA H100 (Hopper, 80 GB HBM3)", ("H100",), (9, 0), 80,
              ("fp32", "fp16", "bf16"), (1, 1, 8), 4096, (2048, 32768)),
    GpuPreset("h200", "NVIDIA H200 (Hopper, 141 GB HBM3e)", ("H200",), (9, 0), 141,
              ("fp32", "fp16", "bf16"), (1, 2, 16), 8192, (4096, 65536)),
    GpuPreset("dgx-spark", "NVIDIA DGX Spark (GB10, 128 GB unified LPDDR5x)", ("GB10",), (12, 1), 128,
              ("fp32", "fp16", "bf16"), (1, 1, 4), 4096, (2048, 32768)),
    GpuPreset("b200", "NVIDIA B200 (Blackwell, 180 GB HBM3e)", ("B200",), (10, 0), 180,
              ("fp32", "fp16", "bf16"), (1, 4, 32), 8192, (4096, 131072)),
    GpuPreset("gb300", "NVIDIA GB300 (Blackwell Ultra, 288 GB HBM3e)", ("GB300", "B300"), (10, 3), 288,
              ("fp32", "fp16", "bf16"), (1, 4, 64), 8192, (4096, 131072)),
)}
# fmt: on


def get_preset(name: str) -> GpuPreset:
    if name not in PRESETS:
        raise DllmError(f"unknown GPU preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_precision(preset: GpuPreset, precision: str) -> None:
    """Refuse, before any work, graphs in a precision the preset's GPU cannot run."""
    if precision not in preset.precisions:
        raise DllmError(
            f"{preset.description} ({preset.sm}) cannot run {precision} graphs; optimize for one of: "
            f"{', '.join(preset.precisions)}"
        )


def matches(preset: GpuPreset, device_name: str, capability: tuple[int, int]) -> bool:
    """Whether a detected GPU is the one the preset targets (capability decides; the name must agree)."""
    named = any(pattern.lower() in device_name.lower() for pattern in preset.name_patterns)
    return tuple(capability) == preset.compute_capability and named
