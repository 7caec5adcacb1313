"""dllm-trt's plugin registry: every custom op a graph handed to TensorRT may contain, for lint-trt.

TensorRT's ONNX parser finds a plugin by node op_type plus the attributes `plugin_namespace` and
`plugin_version`; every other attribute becomes a plugin field. `lint-trt` checks custom nodes
against this table; `build` registers the plugins themselves (trt.moe_plugin, trt.attention_plugin).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.contract import (
    ATTENTION_INPUTS,
    ATTENTION_OP,
    ATTENTION_SCALE,
    MOE_ACTIVATION,
    MOE_EXPERT_INPUTS,
    MOE_INPUT_DTYPES,
    MOE_OP,
    MOE_OUTPUT,
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


def _moe_spec(weight_format: str) -> PluginSpec:
    """DllmMoE with `weight_format` experts, its inputs and dtypes as contract.MOE_INPUT_DTYPES lists them."""
    fixed = (("activation", MOE_ACTIVATION),) + (
        ((MOE_WEIGHT_FORMAT, weight_format),) if weight_format != "float" else ()
    )
    return PluginSpec(
        MOE_OP,
        tuple((name, dtype if dtype == "T" else (dtype,)) for name, dtype in MOE_INPUT_DTYPES[weight_format]),
        ((MOE_OUTPUT, "T"),),
        (("top_k", int), ("activation", str)),
        constant_inputs=MOE_EXPERT_INPUTS[weight_format],
        fixed_attributes=fixed,
    )


PLUGINS: dict[str, PluginSpec] = {
    MOE_OP: _moe_spec("float"),
    ATTENTION_OP: PluginSpec(
        ATTENTION_OP, tuple((name, "T") for name in ATTENTION_INPUTS), (("output", "T"),), ((ATTENTION_SCALE, float),)
    ),
}
# DllmMoE with quantized experts (attribute weight_format): the same node with the stored values and their
# scales in place of T weights.
QUANTIZED_MOE = {fmt: _moe_spec(fmt) for fmt in MOE_INPUT_DTYPES if fmt != "float"}


def plugin_spec(op_type: str, attributes: dict) -> PluginSpec | None:
    """The spec a node of `op_type` with these attributes (name -> value) is checked against, or None."""
    weight_format = attributes.get(MOE_WEIGHT_FORMAT, "float")
    if isinstance(weight_format, bytes):
        weight_format = weight_format.decode()
    if op_type == MOE_OP and weight_format in QUANTIZED_MOE:
        return QUANTIZED_MOE[weight_format]
    return PLUGINS.get(op_type)


__all__ = ["PLUGINS", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "FLOATS", "PluginSpec", "QUANTIZED_MOE", "plugin_spec"]
