"""Fuse each DiffusionGemma MoE layer (router tail + every-expert experts) into one node, per target.

Letters: N tokens (rows of the flattened hidden state), H hidden, E experts, K active experts per
token (``top_k``), I expert width, A = N*K assignments (token n's k-th expert is assignment n*K + k).

The pattern: what ``export`` emits for one MoE layer (the router after its ``proj``, then
``models.diffusion_gemma.moe_all_experts``)::

    logits   = Gemm(router input, proj, transB=1)                    [N, E] fp32   (stays outside)
    probs    = Softmax(logits, axis=-1)                              [N, E]
    p, idx   = TopK(probs, K)                                        [N, K]
    w        = p / ReduceSum(p, -1) * GatherND(per_expert_scale, idx[..., None])     [N, K]
               (a Cast of the gathered scale in bf16/fp16 graphs)
    dense    = ScatterElements(zeros [N, E], idx, w, axis=1)         [N, E]
    gate, up = Split(MatMul(Unsqueeze(x, 0), W_gu [E, H, 2I]), 2)    [E, N, I] each
    y        = MatMul(Gelu_tanh(gate) * up, W_d [E, I, H])           [E, N, H]
    out      = ReduceSum(y * Unsqueeze(Transpose(dense), -1), 0)     [N, H]
               (a Cast of the routing matrix to y's dtype in bf16/fp16 graphs)

x is the experts' input (pre_feedforward_layernorm_2's output); W_gu and W_d are the exporter's
pre-transposed ``gate_up_proj`` / ``down_proj``. The router's norm, scale and proj stay outside
every variant: only what follows its Gemm is fused. What each named rule emits, one node per layer:

``FuseMoE[trt]``: ``dllm_trt::DllmMoE`` (the TensorRT plugin of ``trt.moe_plugin``)::

    inputs   0 hidden [N, H] T   1 router_logits [N, E] fp32   2 per_expert_scale [E] fp32
             3 gate_up_proj [E, 2I, H] T (rows 0..I-1 gate, I..2I-1 up)   4 down_proj [E, H, I] T
    attrs    top_k (int), activation "gelu_tanh", plugin_namespace "dllm_trt", plugin_version "1"
    output   [N, H] T;  semantics: ``kernels.moe_triton.moe_reference``

``FuseMoE[ort-cuda]``: ``com.microsoft::MoE`` (onnxruntime 1.32 contrib op, CUDA provider)::

    inputs   0 input = hidden [N, H] T   1 router_probs = router_logits [N, E] T (a Cast when T is
             not fp32)   2 fc1_experts_weights = gate_up_proj [E, 2I, H]   3 "" (no fc1 bias)
             4 fc2_experts_weights = down_proj * per_expert_scale[e] [E, H, I]
    attrs    k = K, activation_type "geglu", swiglu_fusion 2 ([gate | up] rows, HF's own layout),
             normalize_routing_weights 1

``FuseMoE[ort-cpu]``: ``dllm_trt::RoutedMoE``, a model-local function (onnxruntime inlines it; plain
ONNX ops only) computing the routed token-expert pairs in per-expert capacity slots with one batched
MatMul per projection, see ``routed_moe_function``::

    inputs   0 hidden [N, H]   1 router_logits [N, E]   2 per_expert_scale [E]
             3 gate_up_t [E, H, 2I]   4 down_t [E, I, H]   (the export's own initializers, as they are)
    overload "e{E}_k{K}" (the body depends on E and K)

onnxruntime's ``com.microsoft.MoE`` (1.32; the schema text is read from the installed wheel with
``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``, the rest checked on its
CPU kernel, see tests/optimize/test_cpu_standins.py):

* fc1 is [E, fusion*I, H] and fc2 [E, H, I]: PyTorch's Linear layout, i.e. HF's ``gate_up_proj``
  and ``down_proj`` as stored (older releases documented [E, H, I] for fc1).
* ``router_probs`` are logits: softmax over all E, top-k on the probabilities, then with
  ``normalize_routing_weights=1`` divided by their sum: the reference's order (confirmed on the CPU
  kernel). The CUDA source (contrib_ops/cuda/moe/ft_moe/moe_kernel.cu ``topk_gating_softmax``, as
  stored at commit 0448a49a, which may predate 1.32) computes the softmax in fp32 with expf, stores
  it in T before top-k (exact for fp32 only) and lets the lowest index win a tie, as ONNX TopK
  does. The CPU kernel lets the HIGHEST index win an exact tie (measured): a CPU/CUDA difference.
* ``activation_type`` "relu", "gelu", "silu", "swiglu", "identity" everywhere; "geglu" and "relu2"
  CUDA only. "geglu" is documented as ``GELU(g, approximate='tanh') * l`` and needs a fused fc1:
  ``swiglu_fusion=1`` interleaved rows [g0, l0, g1, l1, ...], ``swiglu_fusion=2`` [g | l]; no fc3;
  ``activation_alpha/beta`` and ``swiglu_limit`` do not apply. Same formula as
  ``gelu_pytorch_tanh(gate) * up``, so it is emitted as the exact form (bitwise equality is not
  claimed: the tanh implementations differ in the last ulp). The CPU kernel rejects "geglu" and
  accepts only ``swiglu_fusion=1``; its "gelu" is the tanh form (measured against both).
* No per-expert output scale: folded into fc2 (``down_proj[e] * per_expert_scale[e]``, computed in
  fp32 and stored in the weights' dtype; exact up to that rounding) because it multiplies each
  expert's output linearly.
* Never run here: no CUDA provider on these machines. ``optimize.cpu_standins`` runs the node on
  CPU from our reading of this spec (wiring and layout checks, not the CUDA kernel).

Why the capacity form for ort-cpu: onnxruntime's CPU time on this op is the expert MatMuls, and
two batched MatMuls over [E, cap, H] let both cores share them, where a MatMul per expert (2E small
ones) runs near one core's streaming bound. Its padding costs E*cap - A rows, so skewed routing (one
expert taking most tokens) makes it lose to the per-expert form; the generation benchmark
(bench/bench_generation.py) is where the choice shows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from dllm_trt.contract import MOE_ACTIVATION as ACTIVATION
from dllm_trt.contract import MOE_OP as PLUGIN_NAME
from dllm_trt.contract import ORT_MOE_DOMAIN as ORT_DOMAIN
from dllm_trt.contract import PLUGIN_NAMESPACE, PLUGIN_VERSION, ROUTED_MOE, SCALED, derived_name, unique_name
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import nodes_of

TRT_DOMAIN = PLUGIN_NAMESPACE  # "dllm_trt": DllmMoE and RoutedMoE live here
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# --------------------------------------------------------------------------------------------
# Small readers of constants and attributes
# --------------------------------------------------------------------------------------------


def _ints(value: ir.Value | None) -> list[int] | None:
    """The integer contents of a constant value (initializer or Constant node), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _attr(value: ir.Value, name: str, default):  # noqa: ANN001, ANN202
    attr = value.producer().attributes.get(name)
    return default if attr is None else attr.value


def _is_zeros(value: ir.Value) -> bool:
    """Expand(0, shape), ConstantOfShape(0) or a constant of zeros."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return not np.any(tensor.numpy())
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Expand":
        fill = ir.convenience.get_const_tensor(node.inputs[0])
        return fill is not None and not np.any(fill.numpy())
    if node.op_type == "ConstantOfShape":
        fill = node.attributes.get("value")
        return fill is None or not np.any(fill.value.numpy())
    return False


def _layer_prefix(logits: ir.Value, fallback: ir.Value) -> str:
    """'layers.3.' from the router's proj weight name, so new initializers read like the checkpoint."""
    node = logits.producer()
    if node is not None and node.op_type == "Cast":
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and node.op_type in ("Gemm", "MatMul"):
        for value in node.inputs[1:]:
            if value is not None and value.name and value.name.endswith("router.proj.weight"):
                return value.name[: -len("router.proj.weight")]
    return f"moe.{fallback.name}."


def _lazy(name: str, dtype: ir.DataType, shape: tuple[int, ...], make) -> ir.LazyTensor:  # noqa: ANN001
    """A weight computed when it is saved (or fed to onnxruntime), not now: a 26B checkpoint's
    expert weights do not fit in memory twice, and the source stays memory-mapped until then."""
    return ir.LazyTensor(
        lambda: ir.Tensor(np.ascontiguousarray(make()), dtype=dtype), dtype, ir.Shape(shape), name=name
    )


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


class MoEFusion(pattern.RewriteRuleClassBase):
    """Router tail + every-expert experts -> one node; ``target`` picks what is emitted."""

    def __init__(self, target: str, top_k: int, num_experts: int) -> None:
        if target not in ("trt", "ort-cuda", "ort-cpu"):
            raise ValueError(f"unknown MoE fusion target '{target}'; choose trt, ort-cuda or ort-cpu")
        super().__init__(name=f"FuseMoE[{target}]")
        self.target = target
        self.top_k = top_k
        self.num_experts = num_experts

    def pattern(
        self, op, logits, x, scale_table, k, norm_axes, index_axes, zeros, x_axes, gate_up_t, down_t,
        routing_axes, expert_axes,
    ):  # fmt: skip
        probs = op.Softmax(logits, _outputs=["probs"])
        top_p, top_i = op.TopK(probs, k, _outputs=["top_p", "top_i"])
        weights = op.Div(top_p, op.ReduceSum(top_p, norm_axes, _outputs=["norm_sum"]))
        gathered = op.GatherND(scale_table, op.Unsqueeze(top_i, index_axes), _outputs=["gathered"])
        weights = op.Mul(weights, pattern.OrValue([op.Cast(gathered), gathered]))
        dense = op.ScatterElements(zeros, top_i, weights, _outputs=["dense"])  # [N, E]
        gate_up = op.MatMul(op.Unsqueeze(x, x_axes), gate_up_t)  # [E, N, 2I]
        gate, up = op.Split(gate_up, _allow_other_inputs=True, _outputs=["gate", "up"])
        y = op.MatMul(op.Mul(op.Gelu(gate, approximate="tanh"), up), down_t)  # [E, N, H]
        routing = op.Unsqueeze(op.Transpose(dense, _outputs=["dense_t"]), routing_axes)  # [E, N, 1]
        routing = pattern.OrValue([op.Cast(routing), routing])
        return op.ReduceSum(op.Mul(y, routing), expert_axes, _outputs=["out"])

    def check(
        self, context, logits, x, scale_table, k, norm_axes, index_axes, zeros, x_axes, gate_up_t, down_t,
        routing_axes, expert_axes, probs, top_p, norm_sum, gathered, dense, gate, dense_t, out, **_,
    ) -> pattern.MatchResult:  # fmt: skip
        del context
        result = pattern.MatchResult()
        # routing, in the reference's order
        if _ints(k) != [self.top_k]:
            return result.fail(f"TopK k={_ints(k)} is not the model's top_k_experts={self.top_k}", k)
        if logits.shape is not None and logits.shape.rank() != 2:
            return result.fail(f"router logits have rank {logits.shape.rank()}, expected [N, E]", logits)
        if _attr(probs, "axis", -1) not in (-1, 1):
            return result.fail("Softmax is not over the experts axis", probs)
        topk = top_p.producer()
        if topk.attributes.get_int("axis", -1) not in (-1, 1):
            return result.fail("TopK is not over the experts axis", top_p)
        if topk.attributes.get_int("largest", 1) != 1:
            return result.fail("TopK picks the smallest probabilities", top_p)
        if _ints(norm_axes) not in ([-1], [1]) or _attr(norm_sum, "keepdims", 1) != 1:
            return result.fail("the top-k renormalisation is not a keepdims sum over K", norm_sum)
        if _ints(index_axes) not in ([-1], [2]) or _attr(gathered, "batch_dims", 0) != 0:
            return result.fail("per_expert_scale is not gathered by expert id", gathered)
        if scale_table.shape is not None and tuple(scale_table.shape.dims) != (self.num_experts,):
            return result.fail(f"per_expert_scale has shape {scale_table.shape}, expected [E={self.num_experts}]")
        if _attr(dense, "axis", 0) not in (1, -1) or _attr(dense, "reduction", "none") != "none":
            return result.fail("the routing matrix is not a ScatterElements over the experts axis", dense)
        if not _is_zeros(zeros):
            return result.fail("the routing matrix is not scattered into zeros", zeros)
        # experts
        if _ints(x_axes) != [0]:
            return result.fail("the experts' input is not unsqueezed on a leading experts axis", x)
        gu, dn = ir.convenience.get_const_tensor(gate_up_t), ir.convenience.get_const_tensor(down_t)
        if gu is None or dn is None:
            return result.fail("expert weights are not initializers", gate_up_t if gu is None else down_t)
        if len(gu.shape) != 3 or gu.shape[0] != self.num_experts or gu.shape[2] % 2:
            return result.fail(f"gate_up weight {tuple(gu.shape)} is not [E={self.num_experts}, H, 2I]", gate_up_t)
        num_experts, hidden, width = gu.shape[0], gu.shape[1], gu.shape[2] // 2
        if tuple(dn.shape) != (num_experts, width, hidden):
            return result.fail(f"down weight {tuple(dn.shape)} is not [E, I, H] = {(num_experts, width, hidden)}")
        if x.shape is not None and (x.shape.rank() != 2 or x.shape.dims[-1] != hidden):
            return result.fail(f"experts' input {x.shape} is not [N, H={hidden}]", x)
        split = gate.producer()
        sizes = _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if split.attributes.get_int("axis", 0) not in (2, -1) or (sizes is not None and sizes != [width, width]):
            return result.fail("gate/up are not the two halves of the last axis", gate)
        if list(_attr(dense_t, "perm", [1, 0])) != [1, 0] or _ints(routing_axes) not in ([-1], [2]):
            return result.fail("the routing matrix is not transposed to [E, N, 1]", dense_t)
        if _ints(expert_axes) != [0] or _attr(out, "keepdims", 1) != 0:
            return result.fail("the experts' outputs are not summed over the experts axis", out)
        dtype = x.dtype
        if dtype is not None and (gu.dtype != dtype or dn.dtype != dtype):
            return result.fail(f"weights ({gu.dtype}, {dn.dtype}) and activations ({dtype}) differ in dtype")
        if self.target in ("trt", "ort-cuda") and dtype is not None and dtype not in FLOAT_TYPES:
            return result.fail(f"{self.target} MoE takes fp32/fp16/bf16, got {dtype}", x)
        if self.target == "ort-cuda" and ir.convenience.get_const_tensor(scale_table) is None:
            return result.fail("per_expert_scale is not a constant, so it cannot be folded into fc2", scale_table)
        return result

    def rewrite(self, op, logits, x, scale_table, gate_up_t, down_t, **_):  # noqa: ANN001, ANN201
        gu_src, dn_src = gate_up_t.const_value, down_t.const_value
        num_experts, hidden, width = gu_src.shape[0], gu_src.shape[1], gu_src.shape[2] // 2
        dtype, graph = gu_src.dtype, x.graph
        prefix = _layer_prefix(logits, gate_up_t)

        def weight(name: str, shape: tuple[int, ...], make) -> ir.Value:  # noqa: ANN001
            name = unique_name(graph.initializers if graph is not None else (), f"{prefix}experts.{name}")
            return op.initializer(_lazy(name, dtype, shape, make), name=name)

        if self.target == "ort-cpu":
            # the export's own [E, H, 2I] and [E, I, H] initializers: batched MatMul's right operands as is
            out = op.op(ROUTED_MOE, x, logits, scale_table, gate_up_t, down_t, _domain=TRT_DOMAIN)
            out.producer().overload = routed_moe_overload(num_experts, self.top_k)
            return out

        # both layouts below are HF's own: [E, 2I, H] gate rows then up rows, [E, H, I]
        gate_up_proj = weight(
            "gate_up_proj", (num_experts, 2 * width, hidden), lambda: gu_src.numpy().transpose(0, 2, 1)
        )
        if self.target == "trt":
            scale = (
                scale_table if scale_table.dtype == ir.DataType.FLOAT else op.Cast(scale_table, to=ir.DataType.FLOAT)
            )
            down_proj = weight("down_proj", (num_experts, hidden, width), lambda: dn_src.numpy().transpose(0, 2, 1))
            return op.op(
                PLUGIN_NAME, x, logits, scale, gate_up_proj, down_proj, _domain=TRT_DOMAIN, top_k=self.top_k,
                activation=ACTIVATION, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION,
            )  # fmt: skip

        scale_src = ir.convenience.get_const_tensor(scale_table)

        def scaled_down() -> np.ndarray:  # per_expert_scale folded in, computed in fp32
            down = dn_src.numpy().transpose(0, 2, 1).astype(np.float32)  # [E, H, I]
            return (down * scale_src.numpy().astype(np.float32)[:, None, None]).astype(dn_src.numpy().dtype)

        fc2 = weight(derived_name("down_proj", SCALED), (num_experts, hidden, width), scaled_down)
        router = logits if x.dtype in (None, ir.DataType.FLOAT) else op.Cast(logits, to=x.dtype)
        return op.op(
            "MoE", x, router, gate_up_proj, None, fc2, _domain=ORT_DOMAIN,
            k=self.top_k, activation_type="geglu", swiglu_fusion=2, normalize_routing_weights=1,
        )  # fmt: skip


def fusion_rules(model: ir.Model, ctx: PassContext) -> list[pattern.RewriteRule]:
    """The rule fuse_moe applies, for the fusion census (optimize.fusion_census)."""
    del model
    return [MoEFusion.rule(ctx.target, ctx.top_k, ctx.num_experts)]


def fused_nodes(model: ir.Model, ctx: PassContext) -> list[ir.Node]:
    """The nodes fused MoE layers became for `ctx.target`."""
    domain, op_type = {"trt": (TRT_DOMAIN, PLUGIN_NAME), "ort-cuda": (ORT_DOMAIN, "MoE"),
                       "ort-cpu": (TRT_DOMAIN, ROUTED_MOE)}[ctx.target]  # fmt: skip
    return nodes_of(model, domain, op_type)


# --------------------------------------------------------------------------------------------
# ort-cpu: the routed form as a model-local function
# --------------------------------------------------------------------------------------------


class _Ops:
    """`op.Softmax(x, axis=-1)`, `op.TopK(x, k, _outputs=2)`: node building over onnx_ir's public Tape
    (the same calls onnxscript's private TapeBuilder takes)."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.tape.nodes)

    def __getattr__(self, op_type: str):  # noqa: ANN204
        def build(*inputs: ir.Value, _outputs: int = 1, **attributes: object) -> ir.Value | list[ir.Value]:
            if _outputs == 1:
                return self.tape.op(op_type, list(inputs), attributes=attributes)
            return list(self.tape.op_multi_out(op_type, list(inputs), attributes=attributes, num_outputs=_outputs))

        return build


def routed_moe_overload(num_experts: int, top_k: int) -> str:
    return f"e{num_experts}_k{top_k}"


def routed_moe_function(num_experts: int, top_k: int, opset: int) -> ir.Function:
    """``dllm_trt::RoutedMoE``: the exact MoE computing the N*K routed pairs in expert capacity
    slots, plain ONNX ops, one batched MatMul per projection.

    Assignment a = n*K + k of expert e takes slot e*cap + r, r = how many earlier assignments
    chose e (an exclusive CumSum of the one-hot ids), cap = the largest per-expert count of this
    call (ReduceMax, data-dependent). The tokens are gathered into [E, cap, H] (padding rows read
    token 0: computed, never read back), both projections run as batched MatMuls against the
    [E, H, 2I] / [E, I, H] weights, and every assignment's row is gathered back to [N, K, H],
    weighted and summed over K in k order (deterministic, no scatter-add). Same fp32 products
    as the reference, summed in another order: equal to rounding.
    """
    op = _Ops()

    def const(values, dtype=np.int64) -> ir.Value:  # noqa: ANN001
        return op.Constant(value=ir.tensor(np.asarray(values, dtype=dtype)))

    x = ir.Value(name="hidden")  # [N, H]
    logits = ir.Value(name="router_logits")  # [N, E]
    scale = ir.Value(name="per_expert_scale")  # [E]
    gate_up = ir.Value(name="gate_up_t")  # [E, H, 2I]
    down = ir.Value(name="down_t")  # [E, I, H]

    # routing, in the reference's order
    probs = op.Softmax(logits, axis=-1)  # [N, E]
    top_p, top_i = op.TopK(probs, const([top_k]), axis=-1, largest=1, sorted=1, _outputs=2)  # [N, K]
    weights = op.Div(top_p, op.ReduceSum(top_p, const([-1]), keepdims=1))
    weights = op.Mul(weights, op.Cast(op.Gather(scale, top_i, axis=0), to=ir.DataType.FLOAT))  # [N, K] fp32

    # capacity slots
    ids = op.Reshape(top_i, const([-1, 1]))  # [A, 1]
    one_hot = op.Cast(op.Equal(ids, const(np.arange(num_experts))), to=ir.DataType.INT64)  # [A, E]
    rank = op.GatherElements(op.CumSum(one_hot, const(0), exclusive=1), ids, axis=1)  # [A, 1]
    cap = op.ReduceMax(op.ReduceSum(one_hot, const([0]), keepdims=0), keepdims=1)  # [1]
    slot = op.Add(op.Mul(ids, cap), rank)  # [A, 1]
    assignments = op.Squeeze(op.Shape(ids, end=1))  # A = N*K (scalar)
    tokens = op.Div(op.Range(const(0), assignments, const(1)), const(top_k))  # [A] token of each assignment
    empty = op.ConstantOfShape(op.Mul(cap, const([num_experts])), value=ir.tensor(np.zeros(1, np.int64)))
    table = op.Reshape(op.ScatterND(empty, slot, tokens), const([num_experts, -1]))  # [E, cap] token ids

    # the experts, batched over E
    rows = op.Gather(x, table, axis=0)  # [E, cap, H]
    gate, up = op.Split(op.MatMul(rows, gate_up), axis=-1, num_outputs=2, _outputs=2)  # [E, cap, I] each
    y = op.MatMul(op.Mul(op.Gelu(gate, approximate="tanh"), up), down)  # [E, cap, H]

    # back to (token, k) order, weighted, summed over K
    y = op.Gather(op.Flatten(y, axis=2), op.Reshape(slot, const([-1, top_k])), axis=0)  # [N, K, H]
    y = op.Mul(y, op.CastLike(op.Unsqueeze(weights, const([-1])), y))
    out = op.ReduceSum(y, const([1]), keepdims=0)  # [N, H]
    out.name = "out"

    graph = ir.Graph(
        [x, logits, scale, gate_up, down], [out], nodes=op.nodes, opset_imports={"": opset}, name=ROUTED_MOE
    )
    return ir.Function(TRT_DOMAIN, ROUTED_MOE, routed_moe_overload(num_experts, top_k), graph=graph, attributes=[])


def _add_routed_functions(model: ir.Model) -> None:
    """Define dllm_trt::RoutedMoE for every (E, K) overload the graph calls."""
    opset = model.opset_imports.get("", 23)
    for node in model.graph:
        if node.domain == TRT_DOMAIN and node.op_type == ROUTED_MOE:
            key = (TRT_DOMAIN, ROUTED_MOE, node.overload)
            if key not in model.functions:
                num_experts, top_k = (int(v) for v in node.overload[1:].split("_k"))
                model.functions[key] = routed_moe_function(num_experts, top_k, opset)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def fuse_moe(model: ir.Model, ctx: PassContext) -> int:
    """Fuse every MoE layer of ``model`` (in place) into ``ctx.target``'s node; returns how many.

    The optimize stage counts them against the model's MoE layers (optimize.fusion_census). The
    replaced weights and dead shape arithmetic are removed; new weights are computed lazily when
    the model is saved.
    """
    count = pattern.RewriteRuleSet(fusion_rules(model, ctx)).apply_to_model(model)
    if count:
        if ctx.target == "ort-cpu":
            _add_routed_functions(model)
        model.opset_imports.setdefault(ORT_DOMAIN if ctx.target == "ort-cuda" else TRT_DOMAIN, 1)
        RemoveUnusedNodesPass()(model)
        NameFixPass()(model)
    return count
