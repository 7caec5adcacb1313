"""The `dllm_trt::DllmAttention` plugin: attention TensorRT has no fused kernel for, without scores in memory.

TensorRT fuses attention for fp16/bf16 head sizes 16..256 only; asked again with this package's own
probe (trt.engine.probe_fused_attention), TensorRT for RTX 1.7.1.116 refuses to build head 512 without
decomposition ("Attention operation was not supported by a dedicated kernel") on every target it has
(sm_80, sm_86, sm_89, sm_120, sm_121), bf16 and fp16, grouped (16:2) or not (16:16); TensorRT proper
cannot be installed where this was written. Decomposed, the released full layers write
B x 16 x T x S fp32 scores and probabilities per layer (137 GB for one 4096-token pass at 256K), so
`optimize --target trt` puts this plugin where TensorRT would decompose (contract.ATTENTION_OP).

The node (names in contract.py): op_type `DllmAttention`, attributes `plugin_namespace` "dllm_trt",
`plugin_version` "1", `scale` (float); inputs query [B, Hq, T, D], key and value [B, Hkv, S, D], bias
[B, 1, T, S], output [B, Hq, T, D], all of one type T in fp32, fp16, bf16. Semantics:
kernels.attention_triton.attention_reference.

Built and stored like the MoE plugin (trt.moe_plugin): an IPluginV3 with an `IPluginCreatorV3One`
creator (the one plugin form both libraries' parsers import); when TensorRT serializes it, the
three kernels of kernels.attention_launches are compiled with Triton for the build's target
(trt.triton_aot) and stored in the plugin's `kernels` field, so the engine carries them. Its
workspace is the key-split results, bounded whatever the shapes (attention_launches.workspace_bytes).

Run: enqueue hands `launch_attention` the addresses TensorRT gives it; that picks the key split for the
call's batch, queries and keys, carves the split results out of the workspace, and launches the stored
cubins on TensorRT's stream through the CUDA driver (trt.cuda_launch). `launch_attention` needs no
TensorRT: its tests run it on the CPU with each launch interpreted by Triton (never run on a GPU: no
GPU where this was written).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dllm_trt.contract import ATTENTION_INPUTS, ATTENTION_OP, ATTENTION_SCALE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dllm_trt.kernels.attention_launches import AttentionShape, grids, kernel_specs, splits, workspace_bytes
from dllm_trt.kernels.attention_launches import workspace_layout as split_layout
from dllm_trt.trt import plugin_fields
from dllm_trt.trt.moe_plugin import Launcher
from dllm_trt.trt.triton_aot import CompiledKernel, compile_specs

KERNELS_MAGIC = b"dllm_trt.DllmAttention.kernels/1\0"
_TYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
_classes: dict[int, tuple[type, type]] = {}  # per library module: (plugin, creator)
_creators: list = []  # registered creators must outlive the registry's use of them


def kernels_for(shape: AttentionShape, arch: int, ptx_version: int | None = None) -> dict[str, CompiledKernel]:
    """The plan's three kernels for `shape`, compiled for sm_`arch` (cached per shape and target)."""
    specs = kernel_specs(shape)
    return dict(zip(specs, compile_specs(tuple(specs.values()), arch, ptx_version)))


def launch_attention(
    kernels: Mapping[str, Launcher], shape: AttentionShape, inputs: Sequence[int], output: int, workspace: int,
    batch: int, queries: int, keys: int, stream: int,
) -> None:  # fmt: skip
    """What the plugin's enqueue does, without TensorRT: split the keys as the plan says for these sizes,
    carve the split results out of the workspace (device addresses) and launch. `inputs`: query, key, value
    and bias addresses (contract.ATTENTION_INPUTS order); `kernels`: per stage, a kernel compiled for
    `shape` (trt.cuda_launch.LoadedKernel), so a GPU without TensorRT runs exactly this."""
    if len(inputs) != len(ATTENTION_INPUTS):
        raise ValueError(f"DllmAttention takes {len(ATTENTION_INPUTS)} inputs, got {len(inputs)}")
    if batch * queries == 0:
        return
    count, per_split = splits(shape, batch, queries, keys)
    offsets, _ = split_layout(shape, batch, queries, keys)
    buffers = dict(zip(("q", "k", "v", "bias"), inputs, strict=True), out=output, queries=queries, keys=keys,
                   keys_per_split=per_split, n_splits=count)  # fmt: skip
    buffers |= {name: workspace + offset for name, offset in offsets.items()}
    specs = kernel_specs(shape)
    grid = grids(shape, batch, queries, keys)
    for stage in ("attend",) if count == 1 else ("attend_split", "combine"):
        kernels[stage].launch(grid[stage], [buffers[arg] for arg in specs[stage].args], stream)


def compile_for_graphs(paths: list[Path], arch: int, ptx_version: int | None = None) -> set[AttentionShape]:
    """Compile the kernels of every DllmAttention shape in these graphs before a builder asks; the shapes."""
    import onnx

    shapes = set().union(*(graph_shapes(onnx.load(str(path), load_external_data=False)) for path in paths))
    for shape in shapes:
        kernels_for(shape, arch, ptx_version)
    return shapes


def graph_shapes(model) -> set[AttentionShape]:  # noqa: ANN001 (an onnx.ModelProto without external data)
    """The attention shapes of a graph's DllmAttention nodes, from the shapes shape inference gives their inputs."""
    import onnx

    dtypes = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    nodes = [node for node in model.graph.node if node.op_type == ATTENTION_OP]
    values = {v.name: v.type.tensor_type for v in [*model.graph.value_info, *model.graph.input]}
    if any(name not in values for node in nodes for name in node.input[:2]):  # a graph not from optimize
        inferred = onnx.shape_inference.infer_shapes(model).graph
        values = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.input]}
    shapes = set()
    for node in nodes:
        query, key = (values.get(node.input[i]) for i in (0, 1))
        if query is None or key is None:
            raise ValueError(f"{ATTENTION_OP} node {node.name}: its query or key has no recorded shape")
        q_dims = [d.dim_value for d in query.shape.dim]
        kv_heads = key.shape.dim[1].dim_value
        if not (q_dims[1] and q_dims[3] and kv_heads):  # dim_value 0: a symbolic dimension
            raise ValueError(f"{ATTENTION_OP} node {node.name}: heads and head size must be static, got {q_dims}")
        scale = next((a.f for a in node.attribute if a.name == ATTENTION_SCALE), 1.0)
        shapes.add(AttentionShape(dtypes[query.elem_type], q_dims[1], kv_heads, q_dims[3], scale))
    return shapes


def kernels_in_engine(engine: bytes) -> list[dict]:
    """Every DllmAttention kernel set an engine stores (one per plugin layer and copy TensorRT keeps)."""
    return plugin_fields.kernels_in_engine(engine, KERNELS_MAGIC)


def plugin_classes(trt) -> tuple[type, type]:  # noqa: ANN001
    """(plugin, creator) classes over one library's module (`tensorrt` or `tensorrt_rtx_bindings`)."""
    if id(trt) in _classes:
        return _classes[id(trt)]
    floats = {trt.float32, trt.float16, trt.bfloat16}

    class DllmAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(
            self, scale: float, arch: int | None, ptx_version: int | None, kernels: bytes | None = None
        ) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version = ATTENTION_OP, PLUGIN_VERSION
            self.plugin_namespace, self.num_outputs = PLUGIN_NAMESPACE, 1
            self.scale, self.arch, self.ptx_version = scale, arch, ptx_version
            self.shape: AttentionShape | None = None
            self.compiled: dict[str, CompiledKernel] = {}
            self.loaded: dict = {}
            self.serialized = None  # the field collection, once asked for
            if kernels:
                stored = plugin_fields.unpack_kernels(kernels, KERNELS_MAGIC)
                self.shape = AttentionShape(**stored["shape"])
                self.compiled = {stage: CompiledKernel.from_dict(k) for stage, k in stored["kernels"].items()}

        # ---- IPluginV3 ----
        def get_capability_interface(self, kind):  # noqa: ANN001, ANN201
            return self

        def clone(self):  # noqa: ANN201
            other = DllmAttentionPlugin(self.scale, self.arch, self.ptx_version)
            other.shape, other.compiled = self.shape, dict(self.compiled)
            return plugin_fields.immortal(other)

        # ---- build ----
        def get_output_data_types(self, input_types):  # noqa: ANN001, ANN201
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):  # noqa: ANN001, ANN201
            out = trt.DimsExprs(4)  # [B, Hq, T, D], like the query; a new object, not TensorRT's own input
            for axis in range(4):
                out[axis] = inputs[0][axis]
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs) -> bool:  # noqa: ANN001
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            return desc.type in floats and desc.type == in_out[0].desc.type  # one type for all

        def configure_plugin(self, inputs, outputs) -> None:  # noqa: ANN001
            _, q_heads, _, head_dim = (int(d) for d in inputs[0].desc.dims)
            kv_heads = int(inputs[1].desc.dims[1])
            self.shape = AttentionShape(_TYPES[inputs[0].desc.type.name], q_heads, kv_heads, head_dim, self.scale)

        def get_workspace_size(self, inputs, outputs) -> int:  # noqa: ANN001
            return workspace_bytes(self.shape)

        def get_valid_tactics(self):  # noqa: ANN201
            return []

        def get_fields_to_serialize(self):  # noqa: ANN201
            # TensorRT keeps pointers into the collection and its arrays without copying them: they
            # live as long as the plugin, made once (the builder asks several times).
            if self.serialized is not None:
                return self.serialized
            self.arrays = {ATTENTION_SCALE: (np.array([self.scale], np.float32), trt.PluginFieldType.FLOAT32)}
            if self.shape is not None and self.arch is not None:
                if not self.compiled:
                    self.compiled = kernels_for(self.shape, self.arch, self.ptx_version)
                blob = plugin_fields.pack_kernels(
                    dict(shape=vars(self.shape), kernels={s: k.to_dict() for s, k in self.compiled.items()}),
                    KERNELS_MAGIC,
                )
                self.arrays["kernels"] = (np.frombuffer(blob, np.uint8).copy(), trt.PluginFieldType.UNKNOWN)
            self.fields = [trt.PluginField(name, array, kind) for name, (array, kind) in self.arrays.items()]
            self.serialized = trt.PluginFieldCollection(self.fields)
            return self.serialized

        # ---- run ----
        def set_tactic(self, tactic) -> None:  # noqa: ANN001
            pass

        def on_shape_change(self, inputs, outputs) -> None:  # noqa: ANN001
            pass

        def attach_to_context(self, context):  # noqa: ANN001, ANN201
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> int:  # noqa: ANN001
            from dllm_trt.trt.cuda_launch import LoadedKernel

            if not self.compiled:
                raise RuntimeError("this DllmAttention plugin carries no compiled kernels (from another build?)")
            if not self.loaded:  # first enqueue: TensorRT's warm-up, before any CUDA graph capture
                self.loaded = {stage: LoadedKernel(kernel) for stage, kernel in self.compiled.items()}
            batch, _, queries, _ = (int(d) for d in input_desc[0].dims)
            keys = int(input_desc[1].dims[2])
            launch_attention(
                self.loaded, self.shape, [int(p) for p in inputs], int(outputs[0]), int(workspace), batch, queries,
                keys, int(stream),
            )  # fmt: skip
            return 0

    class DllmAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self, arch: int | None, ptx_version: int | None) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = ATTENTION_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.arch, self.ptx_version = arch, ptx_version
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField(ATTENTION_SCALE, np.array([], np.float32), trt.PluginFieldType.FLOAT32),
                    trt.PluginField("kernels", np.array([], np.uint8), trt.PluginFieldType.UNKNOWN),
                ]
            )

        def create_plugin(self, name, fields, phase):  # noqa: ANN001, ANN201
            values = plugin_fields.fields_of(trt, fields)
            plugin = DllmAttentionPlugin(
                values.get(ATTENTION_SCALE, 1.0), self.arch, self.ptx_version, values.get("kernels")
            )
            return plugin_fields.immortal(plugin)

    _classes[id(trt)] = (DllmAttentionPlugin, DllmAttentionCreator)
    return _classes[id(trt)]


def register_attention_plugin(trt, arch: int | None = None, ptx_version: int | None = None) -> None:  # noqa: ANN001
    """Register the DllmAttention creator with a library's plugin registry: before parsing (with `arch`, the
    build's target) and before deserializing an engine (no `arch` needed: the kernels are in it). A later
    registration replaces an earlier one, so one process can build for several targets."""
    _, creator_class = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    for old in [c for c in _creators if c[0] is trt]:
        registry.deregister_creator(old[1])
        _creators.remove(old)
    creator = creator_class(arch, ptx_version)
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"{trt.__name__} refused to register the {PLUGIN_NAMESPACE}::{ATTENTION_OP} plugin creator")
    _creators.append((trt, creator))


RUNTIME_REQUIREMENT = f"{PLUGIN_NAMESPACE}::{ATTENTION_OP}"  # registered by the tensorrt Step beside DllmMoE
