"""GPU presets: one table, sane entries, precision checks with one-line errors."""

import pytest

from dllm_trt.contract import PRECISIONS
from dllm_trt.engines.gpu_presets import PRESETS, check_precision, get_preset, matches
from dllm_trt.errors import DllmError


def test_every_preset_is_complete_and_consistent():
    assert set(PRESETS) == {"h100", "h200", "dgx-spark", "b200", "gb300"}
    for preset in PRESETS.values():
        assert set(preset.precisions) <= set(PRECISIONS)
        lo, opt, hi = preset.batch
        assert 1 <= lo <= opt <= hi
        assert preset.context[0] <= preset.context[1]
    assert PRESETS["h100"].compute_capability == (9, 0) and PRESETS["dgx-spark"].sm == "sm_121"


def test_a_precision_the_gpu_cannot_run_fails_clearly():
    check_precision(get_preset("h200"), "bf16")
    with pytest.raises(DllmError, match="cannot run int3 graphs; optimize for one of: fp32, fp16, bf16"):
        check_precision(get_preset("h100"), "int3")
    with pytest.raises(DllmError, match="unknown GPU preset 'a100'.*h100"):
        get_preset("a100")


def test_a_detected_gpu_matches_by_capability_and_name():
    assert matches(get_preset("h100"), "NVIDIA H100 80GB HBM3", (9, 0))
    assert not matches(get_preset("h100"), "NVIDIA H200", (9, 0))
    assert not matches(get_preset("h100"), "NVIDIA H100 PCIe", (8, 0))
    assert matches(get_preset("gb300"), "NVIDIA GB300", (10, 3))
