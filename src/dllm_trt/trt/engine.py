"""TensorRT itself, through trt.trt_library: parse one optimized graph into a strongly typed
network, build it for the preset's target with its optimization profile, and say what was built.

After parsing, each attention layer is allowed to run decomposed (two GEMMs and a softmax) exactly
where TensorRT has no fused kernel for its dtype and head size (trt.support.fuses_attention:
every fp32 attention, and fp16/bf16 head sizes outside 16..256, such as the released model's 512
on its full-attention layers); everywhere else the builder must fuse it or fail. This is set on the
parsed IAttention, not as a `TRT_decomposable` node attribute, so the optimized graph stays valid
ONNX (the checker rejects attributes the operator schema lacks).

What was built is read where it can be read without a GPU: the network's layers (attention layers
and which may be decomposed, plugin layers by name) and the layer list the builder logs for a
DETAILED-profiled build (fused attention kernels by name). No precision flags: the graph's dtypes
are the precision (TensorRT 11 and TensorRT for RTX build every network strongly typed).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.trt.trt_library import TrtLibrary

# Kernel names of TensorRT's fused attention in a built engine's layer list (measured on TensorRT for
# RTX 1.7: `_gemm_mha_v2`; decomposed attention shows GEMMs and a softmax instead).
FUSED_ATTENTION_KERNELS = re.compile(r"_gemm_mha|fmha|flash", re.IGNORECASE)


@dataclass
class NetworkSummary:
    layers: int
    attention: int  # IAttention layers
    attention_decomposable: int  # of those, allowed to run unfused (TRT_decomposable=1)
    plugins: Counter = field(default_factory=Counter)  # plugin layer name -> count
    inputs: dict[str, str] = field(default_factory=dict)  # name -> dtype

    def to_dict(self) -> dict:
        return dict(
            layers=self.layers,
            attention=self.attention,
            attention_decomposable=self.attention_decomposable,
            plugins=dict(self.plugins),
            inputs=self.inputs,
        )


def _logger(lib: TrtLibrary, messages: list[str]):  # noqa: ANN202
    trt = lib.trt

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, message) -> None:  # noqa: ANN001
            messages.append(message)

    return Logger()


def parse_network(lib: TrtLibrary, path: Path) -> tuple:
    """(builder, network, parser, messages) with the graph at `path` parsed (external data beside it);
    one line naming the first node the parser refused."""
    trt = lib.trt
    messages: list[str] = []
    logger = _logger(lib, messages)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # the only mode in TensorRT 11 / RTX
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):  # external data is found beside the graph
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise ParseError(lib.name, path, [(e.node_name(), e.node_operator(), e.desc()) for e in errors])
    return builder, network, parser, messages


class ParseError(DllmError):
    """The parser refused a graph; `errors` holds (node, operator, description) of every error."""

    def __init__(self, library: str, path: Path, errors: list[tuple[str, str, str]]) -> None:
        self.errors = errors
        node, op, desc = errors[0] if errors else ("", "", "no error recorded")
        where = f"node '{node}' ({op}): " if node or op else ""
        super().__init__(f"{library}'s ONNX parser rejected {path.name}: {where}{desc} ({len(errors)} error(s))")


_TRT_TYPES = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16"}  # DataType names -> support-table names


def _attention_layers(lib: TrtLibrary, network: object) -> list:
    trt = lib.trt
    layers = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionInputLayer  # get_layer hands out the base class
            layers.append(layer.attention)
    return layers


def allow_decomposition(lib: TrtLibrary, network: object) -> int:
    """Mark decomposable the attention layers with no fused kernel (module docstring); returns how many."""
    from dllm_trt.trt.support import fuses_attention

    count = 0
    for attention in _attention_layers(lib, network):
        query = attention.get_input(0)
        dtype = _TRT_TYPES.get(query.dtype.name, query.dtype.name)
        if not fuses_attention(dtype, int(query.shape[-1])):
            attention.decomposable = True
            count += 1
    return count


def summarize_network(lib: TrtLibrary, network: object) -> NetworkSummary:
    trt = lib.trt
    attention = _attention_layers(lib, network)
    summary = NetworkSummary(network.num_layers, len(attention), sum(bool(a.decomposable) for a in attention))
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            summary.plugins[getattr(layer.plugin, "plugin_name", layer.name)] += 1
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        summary.inputs[tensor.name] = str(tensor.dtype).removeprefix("DataType.")
    return summary


# TensorRT's own default builder optimization level (0..5): what `build` and lint-trt's trial build use.
DEFAULT_OPT_LEVEL = 3


def builder_config(
    lib: TrtLibrary,
    builder: object,
    profiles: list[dict[str, tuple[list[int], list[int], list[int]]]],
    compute_capability: tuple[int, int],
    opt_level: int,
) -> object:
    """The builder config of every dllm-trt engine: target, optimization level, profiles, and for TensorRT
    for RTX `REQUIRE_USER_ALLOCATION`, without which its engines allocate at run time past their static
    limits and cannot be captured in a CUDA graph (its release notes: required for stream capture)."""
    trt = lib.trt
    config = builder.create_builder_config()
    lib.configure_target(config, compute_capability)
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names and kernels in the log
    if lib.ahead_of_time:
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    return config


def build_serialized(
    lib: TrtLibrary,
    parsed: tuple,
    profiles: list[dict[str, tuple[list[int], list[int], list[int]]]],
    compute_capability: tuple[int, int],
    opt_level: int,
    timing_cache: Path | None,
) -> tuple[bytes, list[str]]:
    """One engine with one optimization profile per entry of `profiles` (input name -> min, opt, max
    shapes); returns it and the builder's layer list (DETAILED). The profiles share the weights."""
    builder, network, _, messages = parsed
    config = builder_config(lib, builder, profiles, compute_capability, opt_level)
    cache = None
    if timing_cache is not None and not lib.ahead_of_time:  # no tactic timing without the GPU
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    start = len(messages)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [m for m in messages[start:] if "Error" in m or "error" in m]
        raise DllmError(f"{lib.name} failed to build the engine: {(errors or ['no error logged'])[-1].strip()}")
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    layers = [line for m in messages[start:] if "LayerType" in m for line in m.splitlines() if "LayerType" in line]
    return bytes(serialized), layers


def fused_attention_kernels(layers: list[str]) -> int:
    """How many layers of the built engine are TensorRT's fused attention kernels."""
    return sum(bool(FUSED_ATTENTION_KERNELS.search(line)) for line in layers)


def attention_probe_graph(dtype: str, head_size: int, q_heads: int, kv_heads: int) -> bytes:
    """One opset-23 Attention node as optimize emits it (Q [B, Hq, T, D], K/V [B, Hkv, S, D], an additive
    mask [B, 1, T, S] in Q's dtype), serialized: what `probe_fused_attention` asks the builder about."""
    import onnx
    from onnx import helper

    elem = {"FP16": onnx.TensorProto.FLOAT16, "BF16": onnx.TensorProto.BFLOAT16, "FP32": onnx.TensorProto.FLOAT}[dtype]
    shapes = dict(q=["b", q_heads, "t", head_size], k=["b", kv_heads, "s", head_size],
                  v=["b", kv_heads, "s", head_size], mask=["b", 1, "t", "s"])  # fmt: skip
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], name="attention", scale=1.0, is_causal=0)
    graph = helper.make_graph(
        [node], "attention_probe", [helper.make_tensor_value_info(n, elem, s) for n, s in shapes.items()],
        [helper.make_tensor_value_info("y", elem, ["b", q_heads, "t", head_size])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10).SerializeToString()


def probe_fused_attention(
    lib: TrtLibrary, dtype: str, head_size: int, q_heads: int, kv_heads: int, compute_capability: tuple[int, int]
) -> bool:
    """Ask the real builder whether it fuses this attention: parse one Attention node, leave it not
    decomposable (the parser's default) and build; True when an engine comes out. Ahead of time with
    TensorRT for RTX, on the GPU itself with TensorRT."""
    trt = lib.trt
    messages: list[str] = []
    builder = trt.Builder(_logger(lib, messages))
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, _logger(lib, messages))
    if not parser.parse(attention_probe_graph(dtype, head_size, q_heads, kv_heads)):
        raise DllmError(f"{lib.name}'s parser rejected the attention probe: {parser.get_error(0).desc()}")
    config = builder.create_builder_config()
    lib.configure_target(config, compute_capability)
    profile = builder.create_optimization_profile()
    batch, queries, keys = (1, 1, 2), (1, 16, 64), (1, 64, 256)  # (min, opt, max) of B, T, S
    for name, heads, rows, last in (("q", q_heads, queries, None), ("k", kv_heads, keys, None),
                                    ("v", kv_heads, keys, None), ("mask", 1, queries, keys)):  # fmt: skip
        profile.set_shape(name, *([batch[i], heads, rows[i], head_size if last is None else last[i]] for i in range(3)))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config) is not None
