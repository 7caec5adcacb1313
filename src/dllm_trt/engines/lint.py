"""`dllm-trt lint-trt`: will TensorRT's ONNX parser take these graphs? Checked without TensorRT, in seconds.

Per graph: the opset; every node's op against the support table of the chosen TensorRT version
(trt.support), the dtype of its data tensors against the types the table lists, and the
restrictions the parser enforces on the ops these graphs use (Attention, TopK, Reduce*, Squeeze,
Unsqueeze, ScatterND, LayerNormalization, RotaryEmbedding, Constant); custom nodes against
dllm-trt's plugin registry (trt.plugins); the interface against the model (canvas, vocab, hidden
and every cache's heads/head dim static); the manifest's I/O description against the file; and the
optimization profiles against the dynamic axes. Attention head sizes outside the fused-kernel range
are reported with what TensorRT will do about them.

Results are structured (Finding, LintReport); `table()` renders them for a person.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from dllm_trt.contract import SAMPLING_INPUTS, SAMPLING_OUTPUTS, STAGE_OPTIMIZE, STEP, STEP_INPUTS
from dllm_trt.errors import DllmError
from dllm_trt.manifest import describe_value
from dllm_trt.trt import profiles as prof
from dllm_trt.trt.gpu_presets import get_preset
from dllm_trt.trt.plugins import FLOATS, PLUGIN_NAMESPACE, PLUGIN_VERSION, PLUGINS, plugin_spec
from dllm_trt.trt.support import DEFAULT_VERSION, ONNX_TO_TRT, Support, fuses_attention, load_support

GRAPHS = (STEP,)
TOPK_MAX = 3840  # onnx-tensorrt: "K input must be less than 3840"


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    graph: str
    node: str  # node name (or the input/output name for interface findings)
    op: str
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.graph}: {self.op} '{self.node}': {self.message}"


@dataclass
class OpSummary:
    count: int = 0
    dtypes: set[str] = field(default_factory=set)
    status: str = "ok"


@dataclass
class LintReport:
    version: str
    sources: dict
    ops: dict[tuple[str, str], OpSummary]  # (graph, op) -> summary
    findings: list[Finding]
    profiles: dict[str, prof.DimRange] | None = None
    judged_by: str = "the support table (no TensorRT library asked)"
    preflight: list[Finding] = field(default_factory=list)  # the table's parser findings a real parser replaced

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def table(self) -> str:
        lines = [f"lint-trt: verdict of {self.judged_by}; pre-flight table of TensorRT {self.version}'s ONNX parser"]
        lines += [f"  source ({key}): {text}" for key, text in self.sources.items()]
        width = max([len(op) for _, op in self.ops] + [8])
        lines.append(f"{'graph':<10} {'op':<{width}} {'nodes':>6}  {'dtypes':<24} status")
        for (graph, op), summary in sorted(self.ops.items()):
            dtypes = ",".join(sorted(summary.dtypes)) or "-"
            lines.append(f"{graph:<10} {op:<{width}} {summary.count:>6}  {dtypes:<24} {summary.status}")
        if self.profiles:
            lines.append("profiles (min:opt:max): " + ", ".join(f"{k}={v}" for k, v in self.profiles.items()))
        lines += [f.line() for f in self.findings]
        lines += [f"pre-flight (not the verdict): {f.line()}" for f in self.preflight]
        verdict = "passed" if self.passed else "FAILED"
        lines.append(f"lint-trt {verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


# ---- one graph ------------------------------------------------------------------------------------


class GraphInfo:
    """Names, types, shapes and constants of one ONNX graph, with types filled in for plugin outputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = {o.domain or "": o.version for o in model.opset_import}
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.input_names = {v.name for v in graph.input}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list] = {}
        self.shape_error = ""
        inferred = self._infer(model)
        for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            tensor = value.type.tensor_type
            if tensor.elem_type:
                self.types[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                self.shapes[value.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
                ]
        for name, init in self.initializers.items():
            self.types[name] = init.data_type
            self.shapes[name] = list(init.dims)

    def _infer(self, model: onnx.ModelProto) -> onnx.ModelProto:
        hinted = onnx.ModelProto()
        hinted.CopyFrom(model)
        hinted.graph.value_info.extend(_plugin_value_infos(model.graph, self.initializers))
        try:
            return onnx.shape_inference.infer_shapes(hinted, strict_mode=False, data_prop=False)
        except Exception as exc:  # noqa: BLE001 - inference is a help, not a verdict
            self.shape_error = f"{type(exc).__name__}: {exc}"
            return hinted

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def constant_value(self, name: str) -> list | None:
        if name in self.initializers:
            init = self.initializers[name]
            return None if init.data_location == TensorProto.EXTERNAL else onnx.numpy_helper.to_array(init).tolist()
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return onnx.numpy_helper.to_array(attr.t).tolist()
        return None

    def last_dim(self, name: str, depth: int = 4) -> int | None:
        """Static size of the last axis, looking through Concat (past K/V + new) when inference stopped."""
        shape = self.shapes.get(name)
        if shape and isinstance(shape[-1], int) and shape[-1] > 0:
            return shape[-1]
        node = self.producers.get(name)
        if depth and node is not None and node.op_type in ("Concat", "Identity", "Cast"):
            for src in node.input:
                size = self.last_dim(src, depth - 1)
                if size:
                    return size
        return None


def _plugin_value_infos(graph: onnx.GraphProto, inits: dict) -> list[onnx.ValueInfoProto]:
    """Output types (and shapes where the weights tell them) of dllm_trt plugin nodes, for shape inference."""
    infos = []
    # T of a node whose T inputs are all activations (quantized experts): from the recorded value types
    typed = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        spec = plugin_spec(node.op_type, attrs)
        if spec is None or node.domain in ("", "ai.onnx"):
            continue
        t_names = [name for (formal, kind), name in zip(spec.inputs, node.input) if kind == "T"]
        t_dtype = next(
            (inits[name].data_type for name in t_names if name in inits),
            next((typed[name] for name in t_names if typed.get(name)), TensorProto.UNDEFINED),
        )
        shapes = _plugin_output_shapes(node, attrs, inits)
        for (_formal, kind), name, shape in zip(spec.outputs, node.output, shapes):
            dtype = t_dtype if kind == "T" else helper.np_dtype_to_tensor_dtype(np.dtype(kind[0]))
            if dtype != TensorProto.UNDEFINED and name:
                infos.append(helper.make_tensor_value_info(name, dtype, shape))
    return infos


def _plugin_output_shapes(node: onnx.NodeProto, attrs: dict, inits: dict) -> list:
    dims = {name: list(inits[name].dims) for name in node.input if name in inits}
    if node.op_type == "DllmMoE" and len(node.input) > 4 and node.input[4] in dims:
        return [["moe_tokens", dims[node.input[4]][1]]]  # [N, H]
    return [None] * len(node.output)


def _trt_type(elem_type: int) -> str:
    return ONNX_TO_TRT.get(elem_type, TensorProto.DataType.Name(elem_type))


def _data_tensors(node: onnx.NodeProto, opset: int) -> list[str]:
    """The tensors the operator matrix's "Supported Types" column is about: those of the op's data type."""
    if node.op_type == "Where":
        return [n for n in node.input[1:] if n] + list(node.output[:1])
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return [node.input[0]] if node.input and node.input[0] else list(node.output[:1])
    formals_in, formals_out = list(schema.inputs), list(schema.outputs)
    if not formals_in or formals_in[0].type_str.startswith("tensor("):
        var = formals_out[0].type_str if formals_out else ""
    else:
        var = formals_in[0].type_str
    names = []
    for index, name in enumerate(node.input):
        formal = formals_in[min(index, len(formals_in) - 1)] if formals_in else None
        if name and formal is not None and formal.type_str == var:
            names.append(name)
    for index, name in enumerate(node.output):
        if name and index < len(formals_out) and formals_out[index].type_str == var:
            names.append(name)
    if node.op_type in ("Cast", "CastLike") and node.output:
        names.append(node.output[0])
    return names


def lint_graph(
    model: onnx.ModelProto,
    graph: str,
    support: Support,
    model_facts: dict | None = None,
    manifest_io: dict | None = None,
) -> tuple[dict[str, OpSummary], list[Finding]]:
    """Lint one graph. `model` needs no external data (only weight shapes and types are read)."""
    g = GraphInfo(model)
    findings: list[Finding] = []
    ops: dict[str, OpSummary] = defaultdict(OpSummary)

    def report(severity: str, node: str, op: str, message: str) -> None:
        findings.append(Finding(severity, graph, node, op, message))
        if op in ops and (severity == "error" or ops[op].status == "ok"):
            ops[op].status = severity

    if g.shape_error:
        report("warning", "-", "shape-inference", f"ONNX shape inference failed ({g.shape_error}); fewer checks ran")
    opset = g.opset.get("", g.opset.get("ai.onnx", 0))
    lo, hi = support.opset
    if not lo <= opset <= hi:
        report(
            "error", "-", "opset", f"default-domain opset {opset} is outside TensorRT {support.version}'s {lo}..{hi}"
        )

    for index, node in enumerate(model.graph.node):
        name = node.name or f"#{index}"
        custom = node.domain not in ("", "ai.onnx")
        key = f"{node.domain}::{node.op_type}" if custom else node.op_type
        ops[key].count += 1
        if custom:
            ops[key].dtypes.update(_trt_type(g.types[t]) for t in node.input if t in g.types)
            for message in _check_custom(node, g, support):
                report("error", name, key, message)
            continue
        status = support.status(node.op_type)
        if status != "supported":
            why = "lists it as unsupported" if status == "unsupported" else "does not list it"
            extra = support.restriction(node.op_type)
            report(
                "error",
                name,
                key,
                f"TensorRT {support.version}'s ONNX operator table {why}" + (f" ({extra})" if extra else ""),
            )
            continue
        allowed = support.types(node.op_type)
        for tensor in _data_tensors(node, opset):
            if tensor not in g.types:
                continue
            dtype = _trt_type(g.types[tensor])
            ops[key].dtypes.add(dtype)
            if dtype == "DOUBLE":
                report("warning", name, key, f"'{tensor}' is DOUBLE: TensorRT casts it down to FLOAT")
            elif dtype not in allowed:
                report(
                    "error",
                    name,
                    key,
                    f"'{tensor}' is {dtype}; TensorRT {support.version} supports {node.op_type} on "
                    f"{', '.join(allowed)}",
                )
        check = _NODE_CHECKS.get(node.op_type) or (_check_axes_input if node.op_type.startswith("Reduce") else None)
        if check is not None:
            for severity, message in check(node, g, support):
                report(severity, name, key, message)

    for value in [*model.graph.input, *model.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem not in ONNX_TO_TRT:
            report("error", value.name, "graph-io", f"dtype {TensorProto.DataType.Name(elem)} is not a TensorRT type")
    if model_facts is not None:
        for severity, tensor, message in _check_interface(model, graph, model_facts):
            report(severity, tensor, "interface", message)
    if manifest_io is not None:
        for tensor, message in _check_manifest_io(model, manifest_io):
            report("error", tensor, "manifest", message)
    return dict(ops), findings


# ---- node checks: (severity, message) per problem -------------------------------------------------


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _check_attention(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    out = []
    if any(node.output[1:]):
        out.append(
            (
                "error",
                "TensorRT takes only Attention's first output (Y): present_key/present_value/"
                "qk_matmul_output are unsupported; keep the KV concatenation outside the node",
            )
        )
    for index, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if len(node.input) > index and node.input[index]:
            out.append(("error", f"input {what} is unsupported by TensorRT's parser; concatenate K/V outside"))
    if _attr(node, "softcap", 0.0):
        out.append(("error", "attribute softcap is unsupported by TensorRT's parser"))
    if _attr(node, "qk_matmul_output_mode", 0):
        out.append(("error", "attribute qk_matmul_output_mode is unsupported by TensorRT's parser"))
    if _attr(node, "softmax_precision") is not None:
        out.append(
            (
                "error",
                "TensorRT's parser rejects softmax_precision (\"Setting softmax precision is not "
                'supported in TensorRT Attention"); optimize --target trt leaves it out',
            )
        )
    for index, what in ((0, "Q"), (1, "K"), (2, "V")):
        shape = g.shapes.get(node.input[index]) if len(node.input) > index else None
        if shape is not None and len(shape) != 4 and not (support.attention_3d and len(shape) == 3):
            out.append(("error", f"{what} is {len(shape)}D; TensorRT's Attention import needs 4D [B, heads, S, D]"))
    head = g.last_dim(node.input[0]) or g.last_dim(node.input[1])
    dtype = _trt_type(g.types[node.input[0]]) if node.input[0] in g.types else None
    if _attr(node, "TRT_decomposable") is not None:
        out.append(("warning", "TRT_decomposable is ignored: build decides per dtype and head size"))
    if head is None:
        out.append(("warning", "head size not known statically; TensorRT's fused attention needs it"))
    elif dtype is not None and not fuses_attention(dtype, head, support.version):
        out.append(
            (
                "warning",
                f"no fused TensorRT attention kernel for {dtype} head size {head} (trt.support): "
                "build lets TensorRT run it decomposed (GEMM, softmax, GEMM; the scores go through memory)",
            )
        )
    return out


def _check_topk(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    out = []
    if _attr(node, "sorted", 1) != 1:
        out.append(("error", "TensorRT needs sorted=1"))
    k_name = node.input[1] if len(node.input) > 1 else ""
    if not g.is_constant(k_name):
        out.append(("error", "K must be an initializer or Constant for TensorRT"))
    else:
        k = g.constant_value(k_name)
        k = k[0] if isinstance(k, list) and k else k
        if isinstance(k, int) and k >= TOPK_MAX:
            out.append(("error", f"K={k}; TensorRT needs K < {TOPK_MAX}"))
    return out


def _check_axes_input(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    if len(node.input) > 1 and node.input[1] and not g.is_constant(node.input[1]):
        return [("error", f"axes input '{node.input[1]}' must be a constant (initializer or Constant) for TensorRT")]
    return []


def _check_scatternd(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    reduction = _attr(node, "reduction", "none")
    return [] if reduction == "none" else [("error", f"reduction={reduction!r}: TensorRT supports only 'none'")]


def _check_layernorm(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    return [("error", "TensorRT supports only the first output (Y)")] if any(node.output[1:]) else []


def _check_rotary(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    pos = node.input[3] if len(node.input) > 3 else ""
    if pos and pos in g.types and g.types[pos] != TensorProto.INT64:
        return [("error", f"position_ids '{pos}' is {_trt_type(g.types[pos])}; TensorRT needs INT64")]
    return []


def _check_constant(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[tuple[str, str]]:
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return [("error", f"attribute {bad[0]} is unsupported by TensorRT")] if bad else []


_NODE_CHECKS = {
    "Attention": _check_attention,
    "TopK": _check_topk,
    "Squeeze": _check_axes_input,
    "Unsqueeze": _check_axes_input,
    "ScatterND": _check_scatternd,
    "LayerNormalization": _check_layernorm,
    "RotaryEmbedding": _check_rotary,
    "Constant": _check_constant,
}


def _check_custom(node: onnx.NodeProto, g: GraphInfo, support: Support) -> list[str]:
    """Problems of a custom-domain node: registered with dllm-trt's plugins (or a TensorRT custom op)?"""
    spec = plugin_spec(node.op_type, {a.name: helper.get_attribute_value(a) for a in node.attribute})
    if spec is None:
        if node.op_type in support.custom_ops:
            return []
        return [
            f"custom op {node.op_type} (domain {node.domain!r}) is neither parsed by TensorRT "
            f"{support.version} nor registered by dllm-trt's plugins ({', '.join(PLUGINS)})"
        ]
    problems = []
    for attr, expected in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
        if _attr(node, attr) != expected:
            problems.append(f"attribute {attr}={_attr(node, attr)!r}; the registered plugin has {expected!r}")
    for attr, kind in spec.attributes:
        value = _attr(node, attr)
        if not isinstance(value, kind):
            problems.append(f"attribute {attr} must be a {kind.__name__}, got {value!r}")
    for attr, expected in spec.fixed_attributes:
        if _attr(node, attr) != expected:
            problems.append(f"attribute {attr}={_attr(node, attr)!r}; the plugin implements only {expected!r}")
    if len(node.input) != len(spec.inputs) or len(node.output) != len(spec.outputs):
        problems.append(
            f"has {len(node.input)} inputs/{len(node.output)} outputs; the plugin takes "
            f"{len(spec.inputs)}/{len(spec.outputs)}"
        )
        return problems
    t_seen = set()
    for (formal, kind), name in [*zip(spec.inputs, node.input), *zip(spec.outputs, node.output)]:
        if name not in g.types:
            continue
        dtype = (
            helper.tensor_dtype_to_np_dtype(g.types[name]).name if g.types[name] != TensorProto.BFLOAT16 else "bfloat16"
        )
        allowed = FLOATS if kind == "T" else kind
        if dtype not in allowed:
            problems.append(f"{formal} '{name}' is {dtype}; the plugin takes {'/'.join(allowed)}")
        if kind == "T":
            t_seen.add(dtype)
    if len(t_seen) > 1:
        problems.append(f"the activations and expert weights must share one dtype, got {sorted(t_seen)}")
    for formal, _ in spec.inputs:
        name = node.input[[f for f, _ in spec.inputs].index(formal)]
        if formal in spec.constant_inputs and not g.is_constant(name):
            problems.append(f"{formal} '{name}' must be an initializer: its shape becomes a kernel constant")
    return problems


# ---- interface and manifest -----------------------------------------------------------------------


def expected_static_dims(graph: str, facts: dict) -> dict[str, dict[int, int]]:
    """Axes TensorRT needs static, per graph input/output name: vocab, hidden, heads, head dims.

    The step graph's token and row axes are dynamic (the two phases differ in them); the profiles
    bound them."""
    expected: dict[str, dict[int, int]] = {}
    for spec in facts["layers"]:
        heads = {1: spec["num_kv_heads"], 3: spec["head_dim"]}
        for kind in ("key", "value"):
            expected[f"past_{kind}.{spec['index']}"] = expected[f"{kind}.{spec['index']}"] = heads
    h, v = facts["hidden_size"], facts["vocab_size"]
    sampled, argmax, entropy, next_self_conditioning = SAMPLING_OUTPUTS
    expected[STEP_INPUTS[4]] = expected[next_self_conditioning] = {2: h}
    expected[SAMPLING_INPUTS[1]] = {2: v}  # the sampling noise [B, R, V]
    for name in (sampled, argmax, entropy):
        expected[name] = {}
    return expected


def _check_interface(model: onnx.ModelProto, graph: str, facts: dict) -> list[tuple[str, str, str]]:
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    out = []
    for name, axes in expected_static_dims(graph, facts).items():
        if name not in values:
            out.append(("error", name, f"the {graph} graph has no '{name}', which the runtime binds by name"))
            continue
        dims = values[name].type.tensor_type.shape.dim
        for axis, size in axes.items():
            if axis >= len(dims):
                out.append(("error", name, f"has rank {len(dims)}; expected axis {axis} of size {size}"))
            elif not dims[axis].HasField("dim_value"):
                out.append(
                    (
                        "error",
                        name,
                        f"axis {axis} is dynamic ('{dims[axis].dim_param}'); TensorRT needs it "
                        f"static ({size} for this model): canvas, vocab, hidden and head sizes are build-time",
                    )
                )
            elif dims[axis].dim_value != size:
                out.append(("error", name, f"axis {axis} is {dims[axis].dim_value}; the model says {size}"))
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") and dim.dim_param not in prof.DIMS:
                out.append(
                    (
                        "error",
                        value.name,
                        f"axis {axis} is dynamic ('{dim.dim_param or '?'}') but no "
                        f"profile dimension is named so (known: {', '.join(prof.DIMS)})",
                    )
                )
    return out


def _check_manifest_io(model: onnx.ModelProto, manifest_io: dict) -> list[tuple[str, str]]:
    out = []
    actual = {v.name: describe_value(v) for v in [*model.graph.input, *model.graph.output]}
    for value in [*manifest_io.get("inputs", []), *manifest_io.get("outputs", [])]:
        got = actual.get(value["name"])
        if got is None:
            out.append((value["name"], "in the manifest but not in the graph; re-run optimize"))
        elif (got["dtype"], got["shape"]) != (value["dtype"], value["shape"]):
            out.append(
                (
                    value["name"],
                    f"manifest says {value['dtype']}{value['shape']}, the graph has "
                    f"{got['dtype']}{got['shape']}; re-run optimize",
                )
            )
    return out


# ---- the stage ------------------------------------------------------------------------------------


def check_optimized_manifest(manifest: dict, directory: Path) -> None:
    if manifest.get("stage") != STAGE_OPTIMIZE or manifest.get("target") != "trt":
        raise DllmError(
            f"{directory} holds a '{manifest.get('stage')}' output for target '{manifest.get('target')}'; "
            "TensorRT needs 'dllm-trt optimize EXPORT --target trt' output"
        )
    missing = [g for g in GRAPHS if g not in manifest.get("graphs", {})]
    if missing:
        raise DllmError(f"{directory}/manifest.json describes no {' or '.join(missing)} graph; re-run optimize")


@dataclass(frozen=True)
class LintOptions:
    optimized: Path  # a directory written by 'dllm-trt optimize --target trt'
    trt_version: str | None = None  # a support-table version (trt.support.VERSIONS); None: the newest
    gpu: str = "dgx-spark"  # the GPU preset: its library judges, its profiles are checked
    profiles: tuple[str, ...] = ()  # NAME=MIN:OPT:MAX overrides, as for build
    table_only: bool = False  # the pre-flight table alone, even where a TensorRT library is installed


# Findings about the artifact's contract with dllm-trt's runtime, which no parser checks: always kept.
CONTRACT_CHECKS = ("interface", "manifest", "profile")


def run(options: LintOptions) -> LintReport:
    """Lint the optimized graphs: the verdict of the preset's TensorRT library where it is installed
    (engines.parser_verdict), else of the support table; the contract checks either way."""
    from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

    preset = get_preset(options.gpu)
    version = options.trt_version or ("rtx-1.7" if preset.library == TENSORRT_RTX else None)
    report = lint_artifacts(options.optimized, version, options.gpu, list(options.profiles))
    if options.table_only or not installed(preset.library):
        why = "asked for" if options.table_only else f"{preset.library} is not installed"
        report.judged_by = f"the support table ({why})"
        return report
    if report.profiles is None:  # the profiles are broken: the build could not be tried
        return report
    from dllm_trt.engines.parser_verdict import parser_findings
    from dllm_trt.manifest import read_manifest

    judged_by, findings = parser_findings(options.optimized, read_manifest(options.optimized), preset, report.profiles)
    report.preflight = [f for f in report.findings if f.op not in CONTRACT_CHECKS]
    report.findings = [f for f in report.findings if f.op in CONTRACT_CHECKS] + findings
    report.judged_by = judged_by
    return report


def lint_artifacts(
    directory: Path,
    version: str | None,
    gpu: str,
    profile_overrides: list[str] | None = None,
) -> LintReport:
    """Lint the optimized graphs in `directory` for TensorRT `version` (None: the support table's default)
    and the `gpu` preset's profiles. The defaults are LintOptions'."""
    from dllm_trt.manifest import read_manifest

    manifest = read_manifest(directory)
    check_optimized_manifest(manifest, directory)
    support = load_support(version or DEFAULT_VERSION)
    ops: dict[tuple[str, str], OpSummary] = {}
    findings: list[Finding] = []
    ranges = None
    try:
        ranges = prof.resolve_ranges(get_preset(gpu), manifest["model"], prof.parse_overrides(profile_overrides))
    except DllmError as exc:
        findings.append(Finding("error", "-", "profile", "profile", str(exc)))
    for graph in GRAPHS:
        io = manifest["graphs"][graph]
        path = directory / io["file"]
        if not path.is_file():
            raise DllmError(f"{path} is missing; the manifest names it. Re-run optimize")
        model = onnx.load(str(path), load_external_data=False)
        graph_ops, graph_findings = lint_graph(model, graph, support, manifest["model"], io)
        ops.update({(graph, op): summary for op, summary in graph_ops.items()})
        findings += graph_findings
        if ranges is not None:
            try:
                prof.step_profiles(io, ranges, manifest["model"]["canvas_length"])
            except DllmError as exc:
                findings.append(Finding("error", graph, "profile", "profile", str(exc)))
    return LintReport(support.version, support.sources, ops, findings, ranges)
