"""TensorRT's ONNX operator support, per TensorRT version, from the table kept in trt_support.json.

The JSON holds the 10.15 operator matrix of onnx-tensorrt's docs/operators.md and, per version, what
is added or removed, with the source of every entry in its "sources" block.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from dllm_trt.errors import DllmError

TABLE = Path(__file__).with_name("trt_support.json")
VERSIONS = ("10.14", "10.15", "11.x", "rtx-1.7")
DEFAULT_VERSION = "11.x"

# ONNX element type -> the type names of the operator matrix
ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8",
    onnx.TensorProto.FLOAT4E2M1: "FP4",
    onnx.TensorProto.INT4: "INT4",
    onnx.TensorProto.DOUBLE: "DOUBLE",
}


@dataclass(frozen=True)
class Support:
    version: str
    opset: tuple[int, int]
    ops: dict  # op_type -> {"types": [...], "restriction": str} or {"supported": False}
    custom_ops: tuple[str, ...]
    fused_attention: dict
    sources: dict
    attention_3d: bool = False  # the parser takes 3-D Q/K/V Attention (q_num_heads/kv_num_heads)

    def status(self, op_type: str) -> str:
        """ "supported", "unsupported" (listed N) or "unknown" (not in the table at all)."""
        entry = self.ops.get(op_type)
        if entry is None:
            return "unknown"
        return "supported" if entry.get("supported", True) else "unsupported"

    def types(self, op_type: str) -> tuple[str, ...]:
        return tuple(self.ops.get(op_type, {}).get("types", ()))

    def restriction(self, op_type: str) -> str:
        return self.ops.get(op_type, {}).get("restriction", "")


@functools.lru_cache(maxsize=8)
def load_support(version: str = DEFAULT_VERSION) -> Support:
    if version not in VERSIONS:
        raise DllmError(f"unknown TensorRT version '{version}' for lint-trt; choose one of: {', '.join(VERSIONS)}")
    table = json.loads(TABLE.read_text())
    delta = table["versions"][version]
    ops = {name: dict(entry) for name, entry in table["ops"].items()}
    for name in delta.get("remove", []):
        ops[name] = {"supported": False, "restriction": f"not parsed before TensorRT {_next(version)}"}
    ops.update(delta.get("add", {}))
    sources = {k: v for k, v in table["sources"].items() if k in (version, "10.15", "fused_attention")}
    if version == "rtx-1.7":
        sources["11.x"] = table["sources"]["11.x"]
    return Support(
        version=version,
        opset=tuple(delta["opset"]),
        ops=ops,
        custom_ops=tuple(delta.get("custom_ops", [])),
        fused_attention=table["fused_attention"],
        sources=sources,
        attention_3d=bool(delta.get("attention_3d", False)),
    )


def fuses_attention(dtype: str, head_size: int, version: str = DEFAULT_VERSION) -> bool:
    """Whether TensorRT has a fused attention kernel for this element type ("FP16", "BF16", "FP32", as
    ONNX_TO_TRT names them) and head size: the table's conservative rule (the documented one, which the
    measured builder agrees with, see its sources)."""
    limits = load_support(version).fused_attention
    in_range = limits["head_size_min"] <= head_size <= limits["head_size_max"]
    return dtype in limits["dtypes"] and in_range and head_size % limits["head_size_multiple_of"] == 0


def _next(version: str) -> str:
    return VERSIONS[min(VERSIONS.index(version) + 1, len(VERSIONS) - 1)]
