"""dllm-trt's plugin registry: every custom op a graph handed to TensorRT may contain, for lint-trt.

TensorRT's ONNX parser finds a plugin by node op_type plus the attributes `plugin_namespace` and
`plugin_version`; every other attribute becomes a plugin field. `lint-trt` checks custom nodes
against this table; `build` registers the plugins themselves (trt.moe_plugin, trt.attention_plugin).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dllm_trt.contract import (
    ATTENTION_INPUTS,
    ATTENTION_OP,
    ATTENTION_SCALE,
    MOE_ACTIVATION,
    MOE_OP,
    MOE_WEIGHT_FORMAT,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)

FLOATS = ("float32", "float16", "bfloat16")  # "T" below


@dataclass(frozen=True)
class PluginSpec:
    op_type: str
    inputs: tuple[tuple[str, tuple[str, ...] | str], ...]  # (name, allowed dtypes or "T")
    outputs: tuple[tuple[str, tuple[str, ...] | str], ...]
    attributes: tuple[tuple[str, type], ...]  # required fields besides namespace/version
    constant_inputs: tuple[str, ...] = ()  # must be initializers: their shapes become kernel constants
    fixed_attributes: tuple[tuple[str, object], ...] = ()  # fields with the only value the kernels implement


_F32 = ("float32",)

PLUGINS: dict[str, PluginSpec] = {
    MOE_OP: PluginSpec(
        MOE_OP,
        (
            ("hidden", "T"),
            ("router_logits", _F32),
            ("per_expert_scale", _F32),
            ("gate_up_proj", "T"),
            ("down_proj", "T"),
        ),
        (("out", "T"),),
        (("top_k", int), ("activation", str)),
        constant_inputs=("gate_up_proj", "down_proj"),
        fixed_attributes=(("activation", MOE_ACTIVATION),),
    ),  # fmt: skip
    ATTENTION_OP: PluginSpec(
        ATTENTION_OP,
        tuple((name, "T") for name in ATTENTION_INPUTS),
        (("output", "T"),),
        ((ATTENTION_SCALE, float),),
    ),
}

# DllmMoE with quantized experts (attribute weight_format; contract.MOE_INPUTS): the same node with the
# stored values and their scales in place of T weights.
_FP8, _FP4 = ("float8_e4m3fn",), ("float4_e2m1fn",)
_QUANTIZED_EXPERTS = {
    "fp8": (("gate_up_proj", _FP8), ("down_proj", _FP8), ("gate_up_scale", _F32), ("down_scale", _F32)),
    "nvfp4": (("gate_up_proj", _FP4), ("down_proj", _FP4), ("gate_up_block_scale", _FP8),
              ("down_block_scale", _FP8), ("gate_up_global_scale", _F32), ("down_global_scale", _F32)),
}  # fmt: skip
QUANTIZED_MOE = {
    fmt: replace(
        PLUGINS[MOE_OP],
        inputs=PLUGINS[MOE_OP].inputs[:3] + experts,
        constant_inputs=tuple(name for name, _ in experts),
        fixed_attributes=(*PLUGINS[MOE_OP].fixed_attributes, (MOE_WEIGHT_FORMAT, fmt)),
    )
    for fmt, experts in _QUANTIZED_EXPERTS.items()
}


def plugin_spec(op_type: str, attributes: dict) -> PluginSpec | None:
    """The spec a node of `op_type` with these attributes (name -> value) is checked against, or None."""
    weight_format = attributes.get(MOE_WEIGHT_FORMAT, "float")
    if isinstance(weight_format, bytes):
        weight_format = weight_format.decode()
    if op_type == MOE_OP and weight_format in QUANTIZED_MOE:
        return QUANTIZED_MOE[weight_format]
    return PLUGINS.get(op_type)


__all__ = ["PLUGINS", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "FLOATS", "PluginSpec", "QUANTIZED_MOE", "plugin_spec"]
