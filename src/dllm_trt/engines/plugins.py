"""dllm-trt's plugin registry: every custom op a graph handed to TensorRT may contain, and how to register them.

TensorRT's ONNX parser finds a plugin by node op_type plus the attributes `plugin_namespace` and
`plugin_version`; every other attribute becomes a plugin field. `lint-trt` checks custom nodes
against this table; `build` registers all of them before parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.engines import moe_chain_plugin as chain
from dllm_trt.engines.moe_plugin import ACTIVATION, PLUGIN_NAME, PLUGIN_NAMESPACE

PLUGIN_VERSION = "1"
FLOATS = ("float32", "float16", "bfloat16")  # "T" below


@dataclass(frozen=True)
class PluginSpec:
    op_type: str
    inputs: tuple[tuple[str, tuple[str, ...] | str], ...]  # (name, allowed dtypes or "T")
    outputs: tuple[tuple[str, tuple[str, ...] | str], ...]
    attributes: tuple[tuple[str, type], ...]  # required fields besides namespace/version
    constant_inputs: tuple[str, ...] = ()  # must be initializers: their shapes become Triton constexprs
    fixed_attributes: tuple[tuple[str, object], ...] = ()  # fields with the only value the kernels implement


_F32, _I32 = ("float32",), ("int32",)

PLUGINS: dict[str, PluginSpec] = {
    spec.op_type: spec
    for spec in (
        PluginSpec(
            PLUGIN_NAME,
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
            fixed_attributes=(("activation", ACTIVATION),),
        ),  # fmt: skip
        PluginSpec(
            chain.ROUTE,
            (("router_logits", _F32), ("per_expert_scale", _F32)),
            (("topk_ids", _I32), ("topk_w", _F32)),
            (("top_k", int),),
        ),
        PluginSpec(chain.BUCKET, (("topk_ids", _I32),), (("sorted", _I32), ("counts", _I32)), (("num_experts", int),)),
        PluginSpec(
            chain.EXPERT_UP,
            (("hidden", "T"), ("gate_up_proj", "T"), ("sorted", _I32), ("counts", _I32)),
            (("act", _F32),),
            (("top_k", int),),
            constant_inputs=("gate_up_proj",),
        ),
        PluginSpec(
            chain.EXPERT_DOWN,
            (("act", _F32), ("down_proj", "T"), ("sorted", _I32), ("counts", _I32), ("topk_w", _F32)),
            (("part", _F32),),
            (),
            constant_inputs=("down_proj",),
        ),
    )  # fmt: skip
}


def register_all(ptx_version: int | None = None) -> None:
    """Register every dllm_trt plugin with TensorRT (idempotent); raises RuntimeError without TensorRT."""
    chain.register_chain_plugins(ptx_version)


__all__ = ["PLUGINS", "PLUGIN_NAMESPACE", "PLUGIN_VERSION", "FLOATS", "PluginSpec", "register_all"]
