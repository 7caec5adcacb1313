"""Optimization profiles: preset defaults, user overrides, consistency with the model, per-input shapes."""

import pytest

from dllm_trt.errors import DllmError
from dllm_trt.trt import profiles as prof
from dllm_trt.trt.gpu_presets import get_preset

MODEL = dict(canvas_length=256, sliding_window=1024, vocab_size=262144, hidden_size=2816)


def test_defaults_come_from_the_preset_and_the_model():
    ranges = prof.resolve_ranges(get_preset("h100"), MODEL)
    assert ranges["batch"] == prof.DimRange(1, 1, 8)
    assert ranges["new_tokens"] == prof.DimRange(1, 256, 4096)  # opt: committing one canvas
    assert ranges["cache_full"] == prof.DimRange(0, 2048, 32768)
    assert ranges["cache_sliding"] == prof.DimRange(0, 1023, 1023)  # never more than window - 1


def test_overrides_replace_one_dimension():
    overrides = prof.parse_overrides(["batch=1:4:16", "cache_full=4096"])
    assert overrides == {"batch": prof.DimRange(1, 4, 16), "cache_full": prof.DimRange(4096, 4096, 4096)}
    ranges = prof.resolve_ranges(get_preset("h200"), MODEL, overrides)
    assert ranges["batch"].max == 16 and ranges["cache_full"].opt == 4096


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch", "NAME=MIN:OPT:MAX"),
        ("heads=1:2:3", "NAME=MIN:OPT:MAX"),
        ("batch=1:x:3", "not MIN:OPT:MAX"),
        ("batch=1:2", "three integers"),
    ],
)
def test_bad_override_strings_fail_in_one_line(text, message):
    with pytest.raises(DllmError, match=message):
        prof.parse_overrides([text])


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch=4:2:8", "min <= opt <= max"),
        ("batch=0:1:8", "batch starts at 1"),
        ("new_tokens=1:64:128", "at least the canvas length 256"),
        ("cache_sliding=0:512:2048", "sliding_window - 1 = 1023"),
        ("cache_full=0:256:512", "reaches past cache_full"),
    ],
)
def test_inconsistent_profiles_are_refused(override, message):
    with pytest.raises(DllmError, match=message):
        prof.resolve_ranges(get_preset("h100"), MODEL, prof.parse_overrides([override]))


def test_one_profile_for_both_phases_or_one_per_phase_where_a_denoise_step_never_sees_an_empty_cache():
    ranges = prof.resolve_ranges(get_preset("h100"), MODEL)
    io = {"inputs": [
        {"name": "input_ids", "shape": ["batch", "new_tokens"]},
        {"name": "self_conditioning", "shape": ["batch", "rows", 2816]},
        {"name": "past_key.0", "shape": ["batch", 8, "cache_sliding", 256]},
        {"name": "temperature", "shape": []},
    ]}  # fmt: skip
    (both,) = prof.step_profiles(io, ranges, MODEL["canvas_length"]).values()
    assert "temperature" not in both  # static inputs need no profile
    assert both["input_ids"] == ([1, 1], [1, 256], [8, 4096])  # a prompt up to new_tokens max, opt a canvas
    assert both["self_conditioning"] == ([1, 0, 2816], [1, 256, 2816], [8, 256, 2816])  # no rows up to a canvas
    assert both["past_key.0"] == ([1, 8, 0, 256], [1, 8, 1023, 256], [8, 8, 1023, 256])
    per_phase = prof.step_profiles(io, ranges, MODEL["canvas_length"], per_phase=True)
    prompt, canvas = per_phase["prompt"], per_phase["canvas"]
    assert list(per_phase) == list(prof.PHASES) == ["prompt", "canvas"]
    assert prompt["input_ids"] == both["input_ids"]
    assert prompt["self_conditioning"] == ([1, 0, 2816], [1, 0, 2816], [8, 0, 2816])  # an encoder pass: no rows
    assert prompt["past_key.0"][0] == [1, 8, 0, 256]  # the prompt's encoder pass has no cache yet
    assert canvas["input_ids"] == ([1, 256], [1, 256], [8, 256])  # a denoise step: the canvas, every row
    assert canvas["self_conditioning"] == ([1, 256, 2816], [1, 256, 2816], [8, 256, 2816])
    assert canvas["past_key.0"] == ([1, 8, 1, 256], [1, 8, 1023, 256], [8, 8, 1023, 256])


def test_an_unnamed_dynamic_axis_is_refused_naming_the_input():
    io = {"inputs": [{"name": "canvas_ids", "shape": ["batch", "canvas"]}]}
    with pytest.raises(DllmError, match=r"canvas_ids axis 1 is dynamic \('canvas'\)"):
        prof.input_shapes(io, prof.resolve_ranges(get_preset("h100"), MODEL))
