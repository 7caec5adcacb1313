"""dllm-trt's plugin registry: every custom op a graph handed to TensorRT may contain, for lint-trt.

TensorRT's ONNX parser finds a plugin by node op_type plus the attributes `plugin_namespace` and
`plugin_version`; every other attribute becomes a plugin field. `lint-trt` checks custom nodes
against this table; `build` registers the plugins themselves (engines.moe_plugin).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.contract import MOE_ACTIVATION, MOE_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION

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
}

__all__ = ["PLUGINS", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "FLOATS", "PluginSpec"]
