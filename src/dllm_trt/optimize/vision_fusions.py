"""Vision-graph forms of the RoPE and attention fusions (placeholder; see optimize/vision.py)."""

from __future__ import annotations

import onnx_ir as ir

from dllm_trt.optimize.context import PassContext


def fuse_axial_rotary(model: ir.Model, ctx: PassContext) -> int:  # noqa: ARG001
    return 0


def fuse_vision_attention(model: ir.Model, ctx: PassContext) -> int:  # noqa: ARG001
    return 0
