"""The optimize pipeline: one explicit, ordered list of passes, each counted and proven.

Every pass maps an onnx_ir Model to itself in place and returns how many patterns it rewrote.
The order matters: a reduced-precision export seen in fp32 first (the patterns are fp32's), static
head counts next (every later pattern, and TensorRT, sees them), norms
(the attention and MoE patterns then see RMSNormalization nodes), attention before the MoE
(independent, but it keeps counts readable), the sampling head after every fusion (it extends the
final graph), the fp8/nvfp4 weights next (quantized from the fp32 values; optimize.quantize),
precision last (it decides dtypes per region of the finished graph), and a clean-up after every pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from dllm_trt.contract import GRAPH_FILES, PRECISIONS, QUANTIZED_PRECISIONS, QUANTIZED_TARGETS, TARGETS
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import Census

PassFn = Callable[[ir.Model, PassContext], int]


@dataclass(frozen=True)
class Pass:
    name: str
    run: PassFn
    graphs: tuple[str, ...] = tuple(GRAPH_FILES)
    precisions: tuple[str, ...] = PRECISIONS
    targets: tuple[str, ...] = TARGETS
    census: Census | None = None  # a fusing pass: counted against the model's own ops (fusion_census)
    required_for: tuple[str, ...] = ()  # targets on which a layer it leaves unfused fails optimize


def _lazy(module: str, function: str) -> Callable:
    """Import a pass when it runs, so that one broken pass module cannot break `--help`."""

    def run(*args: object) -> object:
        import importlib

        return getattr(importlib.import_module(f"dllm_trt.optimize.{module}"), function)(*args)

    run.__name__ = function
    return run


def _census(op: str, module: str, rules: bool = True) -> Census:
    return Census(op, _lazy(module, "fused_nodes"), _lazy(module, "fusion_rules") if rules else None)


# What an unfused layer costs on a GPU target: attention writes its scores to memory, and the MoE runs every
# token through every expert. Norms and RoPE left unfused cost little and are reported only.
FUSED_ON_GPUS = ("trt", "ort-cuda")
QUANTIZE, CONVERT = "quantize_weights", "convert_precision"

PIPELINE: list[Pass] = [
    Pass("upcast_export", _lazy("upcast", "upcast_export")),
    Pass("resolve_reshape_wildcards", _lazy("static_reshape", "resolve_reshape_wildcards")),
    Pass("fuse_rms_norm", _lazy("rms_norm", "fuse_rms_norm"), census=_census("rms_norm", "rms_norm")),
    Pass(
        "fuse_rotary_embedding",
        _lazy("rotary", "fuse_rotary_embedding"),
        census=_census("rotary_embedding", "rotary"),
    ),
    Pass(
        "fuse_attention",
        _lazy("attention", "fuse_attention"),
        census=_census("attention", "attention"),
        required_for=FUSED_ON_GPUS,
    ),
    Pass("fuse_moe", _lazy("moe", "fuse_moe"), census=_census("moe", "moe"), required_for=FUSED_ON_GPUS),
    Pass(
        "add_sampling_head",
        _lazy("sampling_head", "add_sampling_head"),
        census=_census("sampling_head", "sampling_head", rules=False),
    ),
    Pass(QUANTIZE, _lazy("quantize", "quantize_weights"), precisions=QUANTIZED_PRECISIONS, targets=QUANTIZED_TARGETS),
    Pass(CONVERT, _lazy("precision", "convert_precision"), precisions=("fp16", "bf16", *QUANTIZED_PRECISIONS)),
]


def op_counts(model: ir.Model) -> dict[str, int]:
    counts = Counter(
        f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in model.graph.all_nodes()
    )
    return dict(sorted(counts.items()))


def clean_up(model: ir.Model) -> None:
    """Drop what a rewrite left unused; keeps initializers the graph still reads."""
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)


def diff_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if after.get(k, 0) != before.get(k, 0)}
