"""The `dllm_trt::DllmMoE` plugin: one IPluginV3 for TensorRT and TensorRT for RTX alike.

The node (emitted by optimize's fuse_moe for the trt target; names in contract.py): op_type
`DllmMoE`, attributes `plugin_namespace` "dllm_trt", `plugin_version` "1", `top_k` (int),
`activation` "gelu_tanh", `weight_format` ("float" when absent, "fp8", "nvfp4"); inputs hidden
[N, H] T, router_logits [N, E] fp32, per_expert_scale [E] fp32, gate_up_proj [E, 2I, H], down_proj
[E, H, I] (T for "float"; FP8 or FP4 tensors for the quantized formats, followed by their scales:
contract.MOE_INPUTS); output [N, H] T; T in fp32, fp16, bf16. Semantics: kernels.moe_triton.
moe_reference over the dequantized experts (kernels.quantization.dequantize_experts).

Quantized experts reach the plugin as TensorRT's own FP8 and FP4 tensors (the parser keeps the
ONNX initializers' FLOAT8E4M3FN / FLOAT4E2M1 types; FP4 two values a byte) and its kernels
dequantize them (kernels.moe_triton). Measured with TensorRT for RTX 1.7: both build for SM121 and
SM120; FP8 for SM89; FP4 for SM89 is refused by the builder ("Cannot compile for target(s) sm89,
because the model contains HW-specific datatypes: fp4_e2m1"), so gpu_presets offers nvfp4 only
where it builds. The same bytes as UINT8 initializers would avoid that, but the parser widens them
to INT32 (4x the bytes), which defeats the point.

Why an IPluginV3 with an `IPluginCreatorV3One` creator: it is the one plugin form both libraries'
ONNX parsers import (TensorRT for RTX has no Quick Deployable Plugins), and unlike an AOT QDP it has
a workspace and may launch several kernels, so the engine runs `fused_moe`'s five launches
(kernels.moe_launches) instead of a one-launch kernel that recomputes the up GEMM per output slice.

Build (no GPU needed): TensorRT asks the plugin its output types and shapes and which formats it
takes (the graph's own dtypes only: strongly typed), configures it with the profile's token range,
and asks its workspace (the intermediates at the profile's largest token count). Configuring picks
the expert-block rows (`bm`) from the profile's opt token count and compiles the five kernels with
Triton for the build's target architecture (trt.triton_aot), because TensorRT proper may execute
the plugin while it times tactics; on a GPU that is the target they are loaded then too, outside
any capture of TensorRT's. A reconfigured plugin or clone recompiles for its new `bm` and drops the
fields it handed out before, so the fields it serializes always carry the kernels of the block rows
they name: the engine carries its kernels, and needs only this module registered
(`register_moe_plugin`) in the process that deserializes it.

Run: each execution context's plugin loads its kernels when attached (before any enqueue, so
before any CUDA graph capture); enqueue hands `launch_moe` the addresses TensorRT gives it; that
carves the intermediates out of the workspace, computes the five grids for the call's token count and
launches the cubins on TensorRT's stream through the CUDA driver (trt.cuda_launch). Enqueue never
raises into TensorRT: a missing kernel, a module that would have to be loaded inside a capture, or a
failed launch returns a non-zero status with the reason on stderr. `launch_moe` needs no TensorRT: its
tests run it on the CPU with each launch interpreted by Triton, and on a GPU with the compiled
kernels and torch tensors' addresses, eagerly and inside CUDA-graph captures (bench/gpu_session.sh).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from dllm_trt.contract import (
    MOE_ACTIVATION,
    MOE_INPUT_DTYPES,
    MOE_INPUTS,
    MOE_OP,
    MOE_WEIGHT_FORMAT,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
)
from dllm_trt.kernels.moe_launches import STAGES, MoEShape, grids, kernel_specs, tile_m, workspace_layout
from dllm_trt.trt import plugin_fields
from dllm_trt.trt.triton_aot import CompiledKernel, compile_specs

BLOCK_ROWS = (16, 32, 64)  # what moe_launches.tile_m can pick

INPUTS = MOE_INPUTS["float"]
_TYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
_classes: dict[int, tuple[type, type]] = {}  # per library module: (plugin, creator)
_creators: list = []  # registered creators must outlive the registry's use of them


def kernels_for(shape: MoEShape, bm: int, arch: int, ptx_version: int | None = None) -> dict[str, CompiledKernel]:
    """The five kernels of the plan for `shape` with expert blocks of `bm` rows, compiled for sm_`arch`.

    Every block size is compiled at once (one cache entry per shape: the layers share it, and the
    stage compiles it before the builder asks, so a compilation error is an error, not a plugin
    callback's exception that TensorRT would swallow)."""
    specs = {(stage, rows): spec for rows in BLOCK_ROWS for stage, spec in kernel_specs(shape, rows).items()}
    unique = tuple(dict.fromkeys(specs.values()))  # route, bucket and combine do not depend on the block rows
    compiled = dict(zip(unique, compile_specs(unique, arch, ptx_version), strict=True))
    return {stage: compiled[specs[(stage, bm)]] for stage in STAGES}


class Launcher(Protocol):
    def launch(self, grid: tuple[int, int, int], args: list[int], stream: int) -> None: ...


def launch_moe(
    kernels: Mapping[str, Launcher], shape: MoEShape, bm: int, inputs: Sequence[int], output: int, workspace: int,
    n_tokens: int, stream: int,
) -> None:  # fmt: skip
    """What the plugin's enqueue does, without TensorRT: carve the intermediates out of the workspace
    (device addresses), compute the five grids for `n_tokens` and launch each stage's kernel on
    `stream`. `inputs`: the node's input addresses in contract.MOE_INPUTS order; `kernels`: per stage,
    a kernel compiled for `shape` and `bm` (trt.cuda_launch.LoadedKernel), so a GPU without
    TensorRT runs exactly this with torch tensors' addresses."""
    if n_tokens == 0:
        return
    names = MOE_INPUTS[shape.weight_format]
    if len(inputs) != len(names):
        raise ValueError(f"DllmMoE with {shape.weight_format} experts takes {len(names)} inputs, got {len(inputs)}")
    offsets, _ = workspace_layout(shape, n_tokens)
    buffers = dict(zip(names, inputs, strict=True), out=output, n_tokens=n_tokens)
    buffers |= {name: workspace + offset for name, offset in offsets.items()}
    specs = kernel_specs(shape, bm)
    grid = grids(specs, shape, n_tokens)
    for stage in STAGES:
        kernels[stage].launch(grid[stage], [buffers[arg] for arg in specs[stage].args], stream)


def compile_for_graphs(paths: list[Path], arch: int, ptx_version: int | None = None) -> set[MoEShape]:
    """Compile the kernels of every DllmMoE shape in these graphs before a builder asks; the shapes."""
    import onnx

    shapes = set().union(*(graph_shapes(onnx.load(str(path), load_external_data=False)) for path in paths))
    for shape in shapes:
        kernels_for(shape, BLOCK_ROWS[0], arch, ptx_version)
    return shapes


def graph_shapes(model) -> set[MoEShape]:  # noqa: ANN001 (an onnx.ModelProto without external data)
    """The MoE shapes of a graph's DllmMoE nodes, read from their expert weights and attributes."""
    dtypes = {1: "fp32", 10: "fp16", 16: "bf16"}
    inits = {t.name: t for t in model.graph.initializer}
    typed = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    shapes = set()
    for node in model.graph.node:
        if node.op_type == MOE_OP and node.input[3] in inits:
            gate_up = inits[node.input[3]]
            attrs = {a.name: a for a in node.attribute}
            top_k = attrs["top_k"].i
            fmt = attrs[MOE_WEIGHT_FORMAT].s.decode() if MOE_WEIGHT_FORMAT in attrs else "float"
            experts, two_width, hidden = gate_up.dims
            # quantized experts: T is the activations' dtype (bf16 in every quantized precision)
            dtype = dtypes[gate_up.data_type] if fmt == "float" else dtypes.get(typed.get(node.input[0]), "bf16")
            shapes.add(MoEShape(dtype, experts, hidden, two_width // 2, top_k, fmt))
    return shapes


# The plugin's `kernels` field (trt.plugin_fields: this marker, a length, the compressed JSON of the shape,
# the tile and the cubins).
KERNELS_MAGIC = b"dllm_trt.DllmMoE.kernels/1\0"


def pack_kernels(stored: dict) -> bytes:
    return plugin_fields.pack_kernels(stored, KERNELS_MAGIC)


def unpack_kernels(blob: bytes, offset: int = 0) -> dict:
    """The kernel set packed at `offset` of `blob` (a field, or a whole engine)."""
    return plugin_fields.unpack_kernels(blob, KERNELS_MAGIC, offset)


def kernels_in_engine(engine: bytes) -> list[dict]:
    """Every kernel set an engine stores (one per plugin layer and copy TensorRT keeps)."""
    return plugin_fields.kernels_in_engine(engine, KERNELS_MAGIC)


def plugin_classes(trt) -> tuple[type, type]:  # noqa: ANN001
    """(plugin, creator) classes over one library's module (`tensorrt` or `tensorrt_rtx_bindings`)."""
    if id(trt) in _classes:
        return _classes[id(trt)]
    floats = {trt.float32, trt.float16, trt.bfloat16}

    class DllmMoEPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(
            self, top_k: int, activation: str, arch: int | None, ptx_version: int | None, kernels: bytes | None = None,
            weight_format: str = "float", resolve_arch: Callable[[], int | None] | None = None,
        ) -> None:  # fmt: skip
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = MOE_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.num_outputs = 1
            if activation != MOE_ACTIVATION:
                raise ValueError(f"DllmMoE implements activation {MOE_ACTIVATION!r}, the node says {activation!r}")
            if weight_format not in MOE_INPUTS:
                raise ValueError(f"DllmMoE weight_format {weight_format!r} is not one of {tuple(MOE_INPUTS)}")
            self.top_k, self.activation, self.arch, self.ptx_version = top_k, activation, arch, ptx_version
            self.weight_format, self.resolve_arch = weight_format, resolve_arch
            self.shape: MoEShape | None = None
            self.bm: int | None = None
            self.compiled: dict[str, CompiledKernel] = {}
            self.compiled_for: tuple[MoEShape, int] | None = None  # the (shape, bm) `compiled` was made for
            self.loaded: dict = {}  # stage -> LoadedKernel, for `compiled`
            self.serialized = None  # the field collection for the current (shape, bm), once asked for
            self.kept: list = []  # every collection handed out: TensorRT may still point into an older one
            if kernels:
                stored = unpack_kernels(kernels)
                self.shape, self.bm = MoEShape(**stored["shape"]), stored["bm"]
                self.compiled = {stage: CompiledKernel.from_dict(k) for stage, k in stored["kernels"].items()}
                self.compiled_for = (self.shape, self.bm)

        # ---- IPluginV3 ----
        def get_capability_interface(self, kind):  # noqa: ANN001, ANN201
            return self

        def clone(self):  # noqa: ANN201
            other = DllmMoEPlugin(
                self.top_k, self.activation, self.arch, self.ptx_version, None, self.weight_format, self.resolve_arch
            )
            other.shape, other.bm = self.shape, self.bm
            other.compiled, other.compiled_for, other.loaded = dict(self.compiled), self.compiled_for, dict(self.loaded)
            return plugin_fields.immortal(other)

        # ---- build ----
        def get_output_data_types(self, input_types):  # noqa: ANN001, ANN201
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):  # noqa: ANN001, ANN201
            out = trt.DimsExprs(2)  # [N, H], like hidden; a new object, not TensorRT's own input
            out[0], out[1] = inputs[0][0], inputs[0][1]
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs) -> bool:  # noqa: ANN001
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in (1, 2):  # router logits and per-expert scales stay fp32
                return desc.type == trt.float32
            if self.weight_format != "float" and 3 <= pos < num_inputs:  # the stored experts and their scales
                stored = {"float32": trt.float32, "float8_e4m3fn": trt.fp8, "float4_e2m1fn": trt.fp4}
                return desc.type == stored[MOE_INPUT_DTYPES[self.weight_format][pos][1]]
            return desc.type in floats and desc.type == in_out[0].desc.type  # hidden, weights, output share T

        def configure_plugin(self, inputs, outputs) -> None:  # noqa: ANN001
            # Build time only. A creator registered without the target (trt.polygraphy_extension) asks for it
            # here: an exception here fails the build with its message, where one in get_fields_to_serialize
            # would be swallowed and the engine built without kernels.
            if self.arch is None and self.resolve_arch is not None:
                self.arch = self.resolve_arch()
            if self.arch is None:
                raise RuntimeError(
                    f"{PLUGIN_NAMESPACE}::{MOE_OP}: no target architecture for its kernels: build where the GPU is, "
                    "or name one target (polygraphy convert --compute-capabilities 12.1; dllm-trt build --gpu PRESET)"
                )
            experts, two_width, hidden = (int(d) for d in inputs[3].desc.dims)  # FP4 dims count values, not bytes
            dtype = _TYPES[inputs[0].desc.type.name]
            shape = MoEShape(dtype, experts, hidden, two_width // 2, self.top_k, self.weight_format)
            bm = tile_m(max(1, int(inputs[0].opt[0])), shape)  # suits the profile's opt shape
            self.max_tokens = max(1, int(inputs[0].max[0]))
            if (shape, bm) != (self.shape, self.bm):
                # a clone or a reconfigured plugin: fields asked for earlier describe other kernels
                self.shape, self.bm, self.serialized = shape, bm, None
            if self.arch is not None:
                # TensorRT proper may run the plugin while timing tactics: it needs its kernels from here on,
                # loaded now (outside any capture of TensorRT's) where this thread's GPU is the build's target
                self._compile()
                self._preload()

        def get_workspace_size(self, inputs, outputs) -> int:  # noqa: ANN001
            return workspace_layout(self.shape, max(1, int(inputs[0].max[0])))[1]

        def get_valid_tactics(self):  # noqa: ANN201
            return []

        def get_fields_to_serialize(self):  # noqa: ANN201
            # TensorRT keeps pointers into the collection and its arrays without copying them: they
            # live as long as the plugin, made once per (shape, bm) (the builder asks several times).
            if self.serialized is not None:
                return self.serialized
            arrays = dict(
                top_k=(np.array([self.top_k], np.int32), trt.PluginFieldType.INT32),
                activation=(np.frombuffer(self.activation.encode() + b"\0", np.int8).copy(), trt.PluginFieldType.CHAR),
                weight_format=(
                    np.frombuffer(self.weight_format.encode() + b"\0", np.int8).copy(),
                    trt.PluginFieldType.CHAR,
                ),
            )
            if self.shape is not None and self.arch is not None:
                self._compile()
            if self._ready():
                blob = pack_kernels(
                    dict(shape=vars(self.shape), bm=self.bm, kernels={s: k.to_dict() for s, k in self.compiled.items()})
                )
                arrays["kernels"] = (np.frombuffer(blob, np.uint8).copy(), trt.PluginFieldType.UNKNOWN)
            fields = [trt.PluginField(name, array, kind) for name, (array, kind) in arrays.items()]
            self.serialized = trt.PluginFieldCollection(fields)
            self.kept.append((arrays, fields, self.serialized))
            return self.serialized

        # ---- kernels ----
        def _ready(self) -> bool:
            """Kernels compiled for exactly the block rows the launches will use."""
            return bool(self.compiled) and self.compiled_for == (self.shape, self.bm)

        def _compile(self) -> None:
            if not self._ready():
                self.compiled = kernels_for(self.shape, self.bm, self.arch, self.ptx_version)
                self.compiled_for, self.loaded = (self.shape, self.bm), {}

        def _preload(self) -> None:
            """Load the kernels into this thread's CUDA context when it is a GPU they were compiled for."""
            from dllm_trt.trt.cuda_launch import LoadedKernel, current_arch

            if self.loaded or not self._ready():
                return
            if current_arch() == next(iter(self.compiled.values())).arch:
                self.loaded = {stage: LoadedKernel(kernel) for stage, kernel in self.compiled.items()}

        # ---- run ----
        def set_tactic(self, tactic) -> None:  # noqa: ANN001
            pass

        def on_shape_change(self, inputs, outputs) -> None:  # noqa: ANN001
            pass

        def attach_to_context(self, context):  # noqa: ANN001, ANN201
            other = self.clone()
            other._preload()  # a new execution context: before any enqueue, hence before any capture
            return other

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> int:  # noqa: ANN001
            # Never raises: TensorRT calls this from C++ (an exception there is no error it can report);
            # a non-zero status fails the enqueue, and the reason goes to stderr.
            try:
                return self._enqueue(input_desc, inputs, outputs, workspace, int(stream))
            except Exception as exc:  # noqa: BLE001
                print(f"dllm-trt: DllmMoE enqueue failed: {exc}", file=sys.stderr)
                return 1

        def _enqueue(self, input_desc, inputs, outputs, workspace, stream: int) -> int:  # noqa: ANN001
            from dllm_trt.trt.cuda_launch import LoadedKernel, stream_is_capturing

            if not self._ready():
                print("dllm-trt: this DllmMoE plugin carries no compiled kernels for its block size (an engine "
                      "from another build? rebuild it with this dllm-trt)", file=sys.stderr)  # fmt: skip
                return 1
            if not self.loaded:
                if stream_is_capturing(stream):
                    print("dllm-trt: DllmMoE's kernels were not loaded before a CUDA graph capture; run the "
                          "engine once eagerly first", file=sys.stderr)  # fmt: skip
                    return 1
                self.loaded = {stage: LoadedKernel(kernel) for stage, kernel in self.compiled.items()}
            n_tokens = int(input_desc[0].dims[0])
            pointers = [int(p) for p in inputs]
            launch_moe(self.loaded, self.shape, self.bm, pointers, int(outputs[0]), int(workspace), n_tokens, stream)
            return 0

    class DllmMoECreator(trt.IPluginCreatorV3One):
        def __init__(
            self, arch: int | None, ptx_version: int | None, resolve_arch: Callable[[], int | None] | None = None
        ) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = MOE_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE
            self.arch, self.ptx_version, self.resolve_arch = arch, ptx_version, resolve_arch
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField("top_k", np.array([], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("activation", np.array([], np.int8), trt.PluginFieldType.CHAR),
                    trt.PluginField(MOE_WEIGHT_FORMAT, np.array([], np.int8), trt.PluginFieldType.CHAR),
                    trt.PluginField("kernels", np.array([], np.uint8), trt.PluginFieldType.UNKNOWN),
                ]
            )

        def create_plugin(self, name, fields, phase):  # noqa: ANN001, ANN201
            values = plugin_fields.fields_of(trt, fields)
            plugin = DllmMoEPlugin(
                values["top_k"], values["activation"], self.arch, self.ptx_version, values.get("kernels"),
                values.get(MOE_WEIGHT_FORMAT, "float"), self.resolve_arch,
            )  # fmt: skip
            return plugin_fields.immortal(plugin)

    _classes[id(trt)] = (DllmMoEPlugin, DllmMoECreator)
    return _classes[id(trt)]


def register_moe_plugin(
    trt, arch: int | None = None, ptx_version: int | None = None,  # noqa: ANN001
    resolve_arch: Callable[[], int | None] | None = None,
) -> None:  # fmt: skip
    """Register the DllmMoE creator with a library's plugin registry: before parsing (with `arch`, the
    build's target, e.g. 121) and before deserializing an engine (no `arch` needed: the kernels are in it).
    `resolve_arch`, where the target is known only once a build configures its plugins (a Polygraphy command
    line), is asked then; a build with neither fails naming what to pass.

    A later registration replaces an earlier one, so one process can build for several targets.
    """
    _, creator_class = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    for old in [c for c in _creators if c.trt is trt]:
        registry.deregister_creator(old.creator)
        _creators.remove(old)
    creator = creator_class(arch, ptx_version, resolve_arch)
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"{trt.__name__} refused to register the {PLUGIN_NAMESPACE}::{MOE_OP} plugin creator")
    _creators.append(_Registered(trt, creator))


class _Registered:
    def __init__(self, trt, creator) -> None:  # noqa: ANN001
        self.trt, self.creator = trt, creator


RUNTIME_REQUIREMENT = dict(
    python_plugins=[f"{PLUGIN_NAMESPACE}::{MOE_OP}"],
    register=f"{__name__}.register_moe_plugin",
    module=str(Path(__file__).name),
    polygraphy="stock polygraphy registers it where dllm-trt is installed (entry point polygraphy.run.plugins)",
)
