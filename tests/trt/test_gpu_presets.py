"""GPU presets: one table, sane entries, each built by a library that can target it; one-line errors."""

import pytest

from dllm_trt.contract import PRECISIONS
from dllm_trt.errors import DllmError
from dllm_trt.trt.gpu_presets import PRESETS, check_precision, get_preset, matches
from dllm_trt.trt.trt_library import LIBRARIES, TENSORRT, TENSORRT_RTX, installed, load_library


def test_every_preset_is_complete_and_consistent():
    assert {"h100", "h200", "b200", "gb300", "dgx-spark", "rtx-pro-6000", "rtx-4090"} <= set(PRESETS)
    for preset in PRESETS.values():
        assert set(preset.precisions) <= set(PRECISIONS) and preset.library in LIBRARIES
        lo, opt, hi = preset.batch
        assert 1 <= lo <= opt <= hi
        assert preset.context[0] <= preset.context[1]
        assert preset.needs_gpu == (preset.library == TENSORRT)
    assert PRESETS["h100"].compute_capability == (9, 0) and PRESETS["dgx-spark"].sm == "sm_121"
    assert PRESETS["dgx-spark"].arch == 121 and PRESETS["dgx-spark"].library == TENSORRT_RTX


@pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")
def test_every_ahead_of_time_preset_is_a_target_the_library_names():
    """Asked of the library itself: its ComputeCapability enum lists what it builds for."""
    trt = load_library(TENSORRT_RTX).trt
    for preset in PRESETS.values():
        if preset.library == TENSORRT_RTX:
            major, minor = preset.compute_capability
            assert hasattr(trt.ComputeCapability, f"SM{major}{minor}"), preset.name
    assert not hasattr(trt.ComputeCapability, "SM90")  # why Hopper presets need TensorRT proper


def test_a_precision_the_gpu_cannot_run_fails_clearly():
    check_precision(get_preset("h200"), "bf16")
    with pytest.raises(DllmError, match="cannot run int3 graphs; optimize for one of: fp32, fp16, bf16"):
        check_precision(get_preset("h100"), "int3")
    with pytest.raises(DllmError, match="unknown GPU preset 'v100'.*h100"):
        get_preset("v100")


def test_a_detected_gpu_matches_by_capability_and_name():
    assert matches(get_preset("h100"), "NVIDIA H100 80GB HBM3", (9, 0))
    assert not matches(get_preset("h100"), "NVIDIA H200", (9, 0))
    assert not matches(get_preset("h100"), "NVIDIA H100 PCIe", (8, 0))
    assert matches(get_preset("gb300"), "NVIDIA GB300", (10, 3))
    assert matches(get_preset("dgx-spark"), "NVIDIA GB10", (12, 1))
