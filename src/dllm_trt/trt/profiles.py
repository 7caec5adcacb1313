"""Optimization profiles: one (min, opt, max) range per dynamic dimension.

The step graph names its dynamic axes (manifest `dynamic_axes`): batch, new_tokens, rows,
cache_full and cache_sliding. Its two phases differ only in shapes: `prompt` (an encoder pass over
the prompt or a committed canvas: new_tokens up to the longest prompt, no rows) and `canvas` (a
denoise step: new_tokens = rows = the canvas, never an empty cache, since the prompt is encoded
first). By default the engine has one profile covering both (`step`: rows 0..canvas, opt at the
canvas); `per_phase` gives it one profile per phase instead, which costs engine bytes (TensorRT
keeps each profile's kernels: +13 MiB for the 6-layer `small` preset on SM121) and a second
execution context, for tactics tuned to prompt shapes. Defaults come from the GPU preset;
`--profile name=min:opt:max` (or `name=N` for a fixed size) overrides batch, new_tokens (the
prompt phase) or a cache length.

A model with a vision tower has two more: `image_tokens` (the step's image soft tokens: 0 on every
call but a prompt pass with images, at most batch x new_tokens) and `images` (the vision engine's
images per call; `--profile images=1:1:16` for more).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.errors import DllmError
from dllm_trt.trt.gpu_presets import GpuPreset

DIMS = ("batch", "new_tokens", "rows", "cache_full", "cache_sliding", "image_tokens", "images")
USER_DIMS = ("batch", "new_tokens", "cache_full", "cache_sliding", "images")  # what --profile may set
IMAGES_PER_CALL = (1, 1, 8)  # the vision engine's default images per call: min, opt, max
PHASES = ("prompt", "canvas")  # the optimization profiles of a per-phase engine, in this order
BOTH = "step"  # the one profile of a default engine


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def as_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


def parse_overrides(texts: list[str] | None) -> dict[str, DimRange]:
    """`["batch=1:2:8", "cache_full=4096"]` -> ranges; a bad string is a one-line DllmError."""
    overrides: dict[str, DimRange] = {}
    for text in texts or []:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or name not in USER_DIMS:
            raise DllmError(f"--profile takes NAME=MIN:OPT:MAX with NAME one of {', '.join(USER_DIMS)}; got '{text}'")
        try:
            parts = [int(v) for v in value.split(":")]
        except ValueError:
            raise DllmError(f"--profile {name}: '{value}' is not MIN:OPT:MAX (integers) or a single integer") from None
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3:
            raise DllmError(f"--profile {name}: '{value}' is not MIN:OPT:MAX (three integers) or a single integer")
        overrides[name] = DimRange(*parts)
    return overrides


def default_ranges(preset: GpuPreset, model: dict) -> dict[str, DimRange]:
    canvas = model["canvas_length"]
    window = model["sliding_window"] - 1  # the cache holds the last window - 1 positions of sliding layers
    opt_ctx, max_ctx = preset.context
    ranges = {
        "batch": DimRange(*preset.batch),
        "new_tokens": DimRange(1, canvas, max(canvas, preset.new_tokens_max)),
        "cache_full": DimRange(0, opt_ctx, max_ctx),
        "cache_sliding": DimRange(0, min(opt_ctx, window), min(max_ctx, window)),
    }
    if model.get("vision"):
        ranges["images"] = DimRange(*IMAGES_PER_CALL)
    return ranges


def resolve_ranges(preset: GpuPreset, model: dict, overrides: dict[str, DimRange] | None = None) -> dict[str, DimRange]:
    """Preset defaults with user overrides on top, checked against each other and the model."""
    ranges = default_ranges(preset, model) | (overrides or {})
    for name, dim in ranges.items():
        if not 0 <= dim.min <= dim.opt <= dim.max:
            raise DllmError(f"profile {name}={dim}: needs 0 <= min <= opt <= max")
    if ranges["batch"].min < 1:
        raise DllmError(f"profile batch={ranges['batch']}: the batch starts at 1")
    canvas = model["canvas_length"]
    if ranges["new_tokens"].max < canvas:
        raise DllmError(
            f"profile new_tokens={ranges['new_tokens']}: max must be at least the canvas length {canvas}, "
            "because the encoder commits a whole canvas"
        )
    window = model["sliding_window"] - 1
    if ranges["cache_sliding"].max > window:
        raise DllmError(
            f"profile cache_sliding={ranges['cache_sliding']}: max exceeds sliding_window - 1 = {window}, "
            "the most positions the runtime ever keeps for a sliding layer"
        )
    if ranges["cache_sliding"].max > ranges["cache_full"].max:
        raise DllmError(
            f"profile cache_sliding={ranges['cache_sliding']} reaches past cache_full={ranges['cache_full']}: "
            "a sliding layer never holds more positions than a full layer"
        )
    if "images" in ranges:
        if ranges["images"].min < 1:
            raise DllmError(f"profile images={ranges['images']}: a vision engine call has at least one image")
        # every image token of a pass, whatever its rows: none but in a prompt pass with images
        ranges["image_tokens"] = DimRange(0, 0, ranges["batch"].max * ranges["new_tokens"].max)
    return ranges


def phase_ranges(ranges: dict[str, DimRange], phase: str, canvas: int) -> dict[str, DimRange]:
    """Every dimension's range in one phase, or in both (BOTH; see the module docstring)."""
    out = dict(ranges)
    if phase == BOTH:
        out["rows"] = DimRange(0, canvas, canvas)
        return out
    if phase == "prompt":
        out["rows"] = DimRange(0, 0, 0)
        return out
    fixed = DimRange(canvas, canvas, canvas)
    out["new_tokens"] = out["rows"] = fixed
    if "image_tokens" in out:
        out["image_tokens"] = DimRange(0, 0, 0)  # a denoise step never takes an image
    for name in ("cache_full", "cache_sliding"):
        dim = out[name]
        lo = max(dim.min, 1)
        out[name] = DimRange(lo, max(dim.opt, lo), max(dim.max, lo))
    return out


def input_shapes(graph_io: dict, ranges: dict[str, DimRange]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shapes of every graph input with a dynamic axis, from its manifest description.

    Fails naming the input when an axis is neither a number nor a dimension the profiles know.
    """
    shapes = {}
    for value in graph_io["inputs"]:
        dims = value["shape"]
        if all(isinstance(d, int) for d in dims):
            continue  # static: needs no profile entry
        triple: tuple[list[int], list[int], list[int]] = ([], [], [])
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                for shape in triple:
                    shape.append(dim)
            elif dim in ranges:
                for shape, size in zip(triple, ranges[dim].as_list()):
                    shape.append(size)
            else:
                raise DllmError(
                    f"input {value['name']} axis {axis} is dynamic ('{dim}') but no profile dimension is named so "
                    f"(known: {', '.join(DIMS)}); make it static in optimize or name it after one of those"
                )
        shapes[value["name"]] = triple
    return shapes


def step_profiles(graph_io: dict, ranges: dict[str, DimRange], canvas: int, per_phase: bool = False) -> dict:
    """The step engine's optimization profiles in order: profile name -> input name -> (min, opt, max)."""
    phases = PHASES if per_phase else (BOTH,)
    return {phase: input_shapes(graph_io, phase_ranges(ranges, phase, canvas)) for phase in phases}


def vision_profiles(graph_io: dict, ranges: dict[str, DimRange]) -> dict:
    """A vision engine's one profile: its images per call (its patch count is fixed per graph)."""
    return {"vision": input_shapes(graph_io, ranges)}
