"""The step graph cut into one graph per layer, so that an artifact runs, and is compared, layer by layer.

Why cut instead of marking every layer's output in one session: one session holds every weight (a
full-width checkpoint of a few layers already wants tens of GB in onnxruntime), while a piece holds
one layer's. The cut finds layers by their weights, which every pass keeps named after their
checkpoint tensors (`model.decoder.layers.3.input_layernorm.weight.bfloat16`): the residual stream
entering layer i is the data input of layer i's input norm, and entering the epilogue that of the
final norm. A node belongs to the last of these boundaries it is computed from: the prologue when
none (embedding, self-conditioning, RoPE tables, masks), the epilogue after the last (LM head,
softcap, a fused sampling head); a node computed from weights alone goes with its first user.

Each piece is written as its own ONNX file with its own copy of that layer's weights (onnxruntime
and onnx_ir read external data only from inside a model's directory, links resolved), removed once
the piece has run. Pieces of graphs onnxruntime cannot run as they are (bf16 math, fused MoE nodes) get
the same runnable form as whole graphs (generation.cpu_variant), one piece at a time.

Inside a layer, the tensors compared are found the same way: a norm's output is what its weight's
node emits, its input is that node's data input (RMSNormalization's input 0, or in the exported
form, the `x` of `x * rsqrt(mean(x^2) + eps) * w`), the router's logits are what `router.proj`
emits. A tensor not found is reported as not located, never guessed.

The vision graph is cut the same way (VISION_LAYOUT): its layers are the tower's encoder layers; it
has no final norm, so the epilogue (pooler, standardize, the embedder) starts at the last layer's
output, the residual Add after that layer's post-feedforward norm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import onnx

from dllm_trt.contract import derives_from
from dllm_trt.errors import DllmError

PROLOGUE = -1
FINAL_NORM = "model.decoder.norm.weight"

# (block, module of the layer, which side of it), in the order the layer computes them: the first
# block past its bound names where a layer goes wrong.
BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("input norm", "input_layernorm", "out"),
    ("attention", "post_attention_layernorm", "in"),
    ("attention norm", "post_attention_layernorm", "out"),
    ("dense MLP input norm", "pre_feedforward_layernorm", "out"),
    ("dense MLP", "post_feedforward_layernorm_1", "in"),
    ("dense MLP norm", "post_feedforward_layernorm_1", "out"),
    ("router", "router.proj", "out"),
    ("MoE input norm", "pre_feedforward_layernorm_2", "out"),
    ("MoE", "post_feedforward_layernorm_2", "in"),
    ("MoE norm", "post_feedforward_layernorm_2", "out"),
    ("feed-forward norm", "post_feedforward_layernorm", "out"),
)
ROUTER = "router"
PICKS = "router picks"  # the TopK indices where the graph picks experts itself (the exported form)
# Blocks a router pick feeds: a token whose pick is a tie in fp32 is not judged on these.
AFTER_ROUTER = ("MoE", "MoE norm", "feed-forward norm", "layer output")


# The vision tower's layer blocks (sandwich norms around attention and a gated MLP), in their order.
VISION_BLOCKS: tuple[tuple[str, str, str], ...] = (
    ("input norm", "input_layernorm", "out"),
    ("attention", "post_attention_layernorm", "in"),
    ("attention norm", "post_attention_layernorm", "out"),
    ("MLP input norm", "pre_feedforward_layernorm", "out"),
    ("MLP", "post_feedforward_layernorm", "in"),
    ("MLP norm", "post_feedforward_layernorm", "out"),
)


@dataclass(frozen=True)
class GraphLayout:
    """Where a graph's layers are: their weights' checkpoint prefix, their blocks, what starts the epilogue."""

    prefix: str  # layer i's weights are f"{prefix}.{i}.<module>.weight"
    blocks: tuple[tuple[str, str, str], ...]
    final_norm: str | None  # the epilogue starts at this norm's input; None: at the last layer's output


STEP_LAYOUT = GraphLayout("model.decoder.layers", BLOCKS, FINAL_NORM)
VISION_LAYOUT = GraphLayout("model.encoder.vision_tower.encoder.layers", VISION_BLOCKS, None)


def weight_of(name: str, module: str, layer: int, prefix: str = STEP_LAYOUT.prefix) -> bool:
    """Whether initializer `name` is `module`'s weight in `layer`, under any pass's suffixes."""
    return derives_from(name, f"{prefix}.{layer}.{module}.weight")


@dataclass
class Segment:
    """One piece of the step graph: the prologue (-1), a layer (0..L-1) or the epilogue (L)."""

    index: int
    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    hidden_in: str | None = None  # the residual stream entering (what the reference's value replaces)
    blocks: dict[str, str] = field(default_factory=dict)  # block -> tensor name, where located
    kv: list[str] = field(default_factory=list)  # the key/value graph outputs this piece emits


class _Graph:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = index
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)

    def node_of(self, value: str) -> onnx.NodeProto | None:
        index = self.producer.get(value)
        return None if index is None else self.graph.node[index]

    def cast_chain(self, value: str) -> list[str]:
        """`value`, then the output of each Cast that is, in turn, the only reader of the one before."""
        chain = [value]
        while len(users := self.consumers.get(chain[-1], [])) == 1 and self.graph.node[users[0]].op_type == "Cast":
            chain.append(self.graph.node[users[0]].output[0])
        return chain

    def ancestors(self, value: str) -> set[str]:
        seen, todo = set(), [value]
        while todo:
            node = self.node_of(todo.pop())
            if node is None:
                continue
            for name in node.input:
                if name and name not in seen:
                    seen.add(name)
                    todo.append(name)
        return seen

    def weight_use(self, matches) -> tuple[onnx.NodeProto, set[str]] | None:  # noqa: ANN001 (name -> bool)
        """The one node using the initializer `matches` picks (past any Casts of it), and the weight's values
        (the initializer and those Casts' outputs); None where there is no such weight or it has several users."""
        weight = next((name for name in self.initializers if matches(name)), None)
        if weight is None:
            return None
        chain = self.cast_chain(weight)
        users = self.consumers.get(chain[-1], [])
        return (self.graph.node[users[0]], set(chain)) if len(users) == 1 else None

    def norm_input(self, node: onnx.NodeProto, weight_value: set[str]) -> str | None:
        """The data input x of a norm whose weight `node` uses (RMSNormalization, or x * r(x) * w)."""
        if node.op_type == "RMSNormalization":
            return node.input[0]
        if node.op_type != "Mul":
            return None
        data = [name for name in node.input if name not in weight_value]
        if len(data) != 1:
            return None
        inner = self.node_of(data[0])
        while inner is not None and inner.op_type == "Cast":
            inner = self.node_of(inner.input[0])
        if inner is None or inner.op_type != "Mul" or len(inner.input) != 2:
            return None
        a, b = inner.input
        if a in self.ancestors(b):  # r = rsqrt(mean(x^2) + eps) is computed from x
            return a
        if b in self.ancestors(a):
            return b
        return None


def _last_output(graph: _Graph, layout: GraphLayout, layers: int) -> str | None:
    """The last layer's output: the residual Add reading its post-feedforward norm's output."""
    use = graph.weight_use(partial(weight_of, module="post_feedforward_layernorm", layer=layers - 1,
                                   prefix=layout.prefix))  # fmt: skip
    if use is None:
        return None
    users = graph.consumers.get(graph.cast_chain(use[0].output[0])[-1], [])
    adds = [graph.graph.node[u] for u in users if graph.graph.node[u].op_type == "Add"]
    return adds[0].output[0] if len(users) == 1 and adds else None


def _boundaries(graph: _Graph, layers: int, layout: GraphLayout = STEP_LAYOUT) -> list[str]:
    """The residual stream entering each layer, then the epilogue: the data input of each layer's input norm
    (of the final norm, or the last layer's output), above any Cast or Slice of it."""
    out = []
    for index in range(layers + 1):
        module = "input_layernorm" if index < layers else None
        if module is None and layout.final_norm is None:
            value = _last_output(graph, layout, layers)
        else:
            final = partial(_is_weight, layout.final_norm)
            use = graph.weight_use(partial(weight_of, module=module, layer=index, prefix=layout.prefix) if module
                                   else final)  # fmt: skip
            value = graph.norm_input(*use) if use is not None else None
        while (
            value is not None
            and (producer := graph.node_of(value)) is not None
            and producer.op_type in ("Cast", "Slice")
        ):
            value = producer.input[0]
        if value is None:
            where = f"layer {index}'s input norm" if module else "the final norm"
            raise DllmError(
                f"could not find the hidden state entering {where} (its weight, named after the checkpoint, "
                "used once): the graph cannot be cut per layer"
            )
        out.append(value)
    return out


def _is_weight(weight: str, name: str) -> bool:
    return derives_from(name, weight)


def _labels(graph: _Graph, boundaries: list[str]) -> list[int]:
    """Each node's piece: the last boundary among what it computes from (none: the prologue). A node computed
    from weights alone (a Cast or transpose of one) goes with the first piece that uses it."""
    entering = {value: index for index, value in enumerate(boundaries)}
    graph_inputs = {i.name for i in graph.graph.input}
    nodes = graph.graph.node
    labels, data = [PROLOGUE] * len(nodes), [False] * len(nodes)
    for index, node in enumerate(nodes):
        for name in node.input:
            if name in entering:
                labels[index] = max(labels[index], entering[name])
            if name in graph.producer:
                labels[index] = max(labels[index], labels[graph.producer[name]])
                data[index] = data[index] or data[graph.producer[name]]
            data[index] = data[index] or name in graph_inputs
    for index in reversed(range(len(nodes))):
        if not data[index]:
            users = [u for out in nodes[index].output for u in graph.consumers.get(out, [])]
            labels[index] = min((labels[u] for u in users), default=labels[index])
    return labels


def split_step_graph(model: onnx.ModelProto, layers: int, layout: GraphLayout = STEP_LAYOUT) -> list[Segment]:
    """The prologue, one piece per layer and the epilogue of a step graph (or with VISION_LAYOUT a vision
    graph), loaded without its weights."""
    graph = _Graph(model.graph)
    boundaries = _boundaries(graph, layers, layout)
    labels = _labels(graph, boundaries)
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = [o.name for o in model.graph.output]
    label_of = {out: labels[index] for out, index in graph.producer.items()}
    segments = []
    for index in sorted(set(labels)):
        nodes = [node for node, label in zip(model.graph.node, labels) if label == index]
        inputs, outputs = [], []
        for node in nodes:
            for name in node.input:
                if not name or name in graph.initializers or name in inputs:
                    continue
                if name in graph_inputs or label_of.get(name, index) != index:
                    inputs.append(name)
        produced = {out for node in nodes for out in node.output if out}
        for node in nodes:
            for out in node.output:
                later = any(labels[user] > index for user in graph.consumers.get(out, []))
                if out and (out in graph_outputs or later) and out not in outputs:
                    outputs.append(out)
        segment = Segment(index, nodes, inputs, outputs)
        segment.kv = [o for o in graph_outputs if o in produced and re.match(r"^(key|value)\.\d+$", o)]
        segments.append(segment)
    by_index = {s.index: s for s in segments}
    expected = [PROLOGUE, *range(layers + 1)]
    if sorted(by_index) != expected:
        raise DllmError(
            f"the step graph cuts into pieces {sorted(by_index)}, not the prologue, {layers} layers and the "
            f"epilogue: are its weights named after the checkpoint ({layout.prefix}.N...)?"
        )
    for segment in segments:
        if segment.index >= 0:
            segment.hidden_in = boundaries[segment.index]
            _locate(graph, segment, label_of, layers, layout)
    return segments


def _locate(graph: _Graph, segment: Segment, label_of: dict[str, int], layers: int, layout: GraphLayout) -> None:
    """The residual stream entering `segment` and its blocks' tensors."""
    index = segment.index
    crossing = [name for name in segment.inputs if label_of.get(name, PROLOGUE) >= 0 and name != segment.hidden_in]
    if crossing or segment.hidden_in not in segment.inputs:
        raise DllmError(
            f"piece {index} takes {', '.join(crossing) or 'nothing'} from earlier layers besides the residual stream "
            f"{segment.hidden_in}: the graph's layers cannot be compared one at a time"
        )
    if index == layers:
        return
    for block, module, side in layout.blocks:
        use = graph.weight_use(partial(weight_of, module=module, layer=index, prefix=layout.prefix))
        if use is None:
            continue
        value = graph.cast_chain(use[0].output[0])[-1] if side == "out" else graph.norm_input(*use)
        if value is not None:
            segment.blocks[block] = value
    picks = _topk_of(graph, segment.blocks.get(ROUTER))
    if picks is not None:
        segment.blocks[PICKS] = picks
    for value in segment.blocks.values():
        if value not in segment.outputs and value not in segment.inputs:
            segment.outputs.append(value)


def _topk_of(graph: _Graph, logits: str | None) -> str | None:
    """The indices of the TopK that picks from the router's logits (through its Softmax and Casts), if any:
    what the graph picks is judged, not a recomputation of it. Fused MoE nodes pick inside, from the logits."""
    value = logits
    for _ in range(4):
        if value is None:
            return None
        users = [graph.graph.node[u] for u in graph.consumers.get(value, [])]
        topk = next((node for node in users if node.op_type == "TopK"), None)
        if topk is not None:
            return topk.output[1]
        following = [node for node in users if node.op_type in ("Softmax", "Cast")]
        value = following[0].output[0] if len(following) == 1 else None
    return None


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 (custom domains can stop inference; the graph's own value_info remains)
        inferred = model
    types = {}
    for info in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type
    return types


def write_segment(
    model: onnx.ModelProto, segment: Segment, artifacts: Path, out: Path, types: dict[str, onnx.TypeProto]
) -> Path:
    """`segment` as an ONNX file in `out`, with its own external data: the byte ranges of its weights copied
    from the artifact's data files in chunks (memory holds none of them)."""
    path = out / f"{piece_name(segment.index)}.onnx"
    data_name = path.name + ".data"
    used = {name for node in segment.nodes for name in node.input if name}
    initializers = []
    with (out / data_name).open("wb") as data:
        for init in model.graph.initializer:
            if init.name not in used:
                continue
            init = onnx.TensorProto.FromString(init.SerializeToString())  # the proto's weights are external: small
            if init.data_location == onnx.TensorProto.EXTERNAL:
                entry = {e.key: e.value for e in init.external_data}
                offset = data.tell()
                _copy_range(artifacts / entry["location"], int(entry.get("offset", 0)), int(entry["length"]), data)
                del init.external_data[:]
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", entry["length"])):
                    init.external_data.add(key=key, value=value)
                data.write(b"\0" * (-data.tell() % 64))  # aligned, as onnx writes them
            initializers.append(init)
    missing = [name for name in [*segment.inputs, *segment.outputs] if name not in types]
    if missing:
        raise DllmError(f"the step graph does not say the type of {', '.join(missing[:3])}; re-export it")

    def info(name: str) -> onnx.ValueInfoProto:
        value = onnx.ValueInfoProto(name=name)
        value.type.CopyFrom(types[name])
        return value

    graph = onnx.helper.make_graph(
        segment.nodes, f"piece_{segment.index}", [info(n) for n in segment.inputs], [info(n) for n in segment.outputs],
        initializer=initializers,
    )  # fmt: skip
    graph.value_info.extend(info(n) for n in {o for node in segment.nodes for o in node.output} if n in types)
    piece = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    piece.functions.extend(model.functions)
    onnx.save(piece, str(path))
    return path


def _copy_range(source: Path, offset: int, length: int, into) -> None:  # noqa: ANN001 (binary file)
    with source.open("rb") as handle:
        handle.seek(offset)
        while length:
            chunk = handle.read(min(length, 1 << 24))
            if not chunk:
                raise DllmError(f"{source} ends inside a weight; the artifact is truncated (run dllm-trt inspect)")
            into.write(chunk)
            length -= len(chunk)


def piece_name(index: int) -> str:
    return f"piece_{index if index >= 0 else 'prologue'}"


class LayerGraphs:
    """The pieces of an artifact directory's step graph, written on demand into `scratch`, runnable on CPU."""

    def __init__(
        self, artifacts: Path, graph_file: str, layers: int, scratch: Path, layout: GraphLayout = STEP_LAYOUT
    ) -> None:
        self.artifacts, self.scratch = artifacts, scratch
        self.model = onnx.load(str(artifacts / graph_file), load_external_data=False)
        self.segments = {s.index: s for s in split_step_graph(self.model, layers, layout)}
        self.types = _value_types(self.model)
        self.layers = layers

    def output_of_layer(self, index: int) -> str:
        return self.segments[index + 1].hidden_in

    def open(self, index: int):  # noqa: ANN201 (onnxruntime session)
        """A session for piece `index` (its runnable CPU form where the graph needs one)."""
        from dllm_trt.generation.cpu_variant import NO_CPU_KERNEL, emulate_bfloat16
        from dllm_trt.generation.ort_session import open_session

        segment = self.segments[index]
        path = write_segment(self.model, segment, self.artifacts, self.scratch, self.types)
        bf16 = any(self.types[n].tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for n in segment.inputs) or any(
            i.data_type == onnx.TensorProto.BFLOAT16
            for i in self.model.graph.initializer
            if i.name in {n for node in segment.nodes for n in node.input}
        )
        standins = any((node.domain, node.op_type) in NO_CPU_KERNEL for node in segment.nodes)
        bf16 = bf16 or any(
            node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in node.attribute)
            for node in segment.nodes
        )
        if bf16 or standins:
            import onnx_ir as ir

            from dllm_trt.generation.cpu_standins import with_cpu_standins

            piece = ir.load(str(path))
            if bf16:
                emulate_bfloat16(piece)
            if standins:
                piece = with_cpu_standins(piece)
            runnable = path.with_suffix(".cpu.onnx")
            ir.save(piece, str(runnable), external_data=runnable.name + ".data")
            del piece
            for written in (path, path.with_name(path.name + ".data")):
                written.unlink()
            path = runnable
        return open_session(path, low_memory=True)

    def close(self, index: int) -> None:
        """Remove what `open(index)` wrote (the runnable copy holds the piece's weights in fp32)."""
        for path in self.scratch.glob(f"{piece_name(index)}.*"):
            path.unlink()
