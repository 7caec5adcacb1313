"""fuse_rotary_embedding: transformers' rotate-half RoPE becomes one opset-23 RotaryEmbedding.

Matches (apply_rotary_pos_emb with unsqueeze_dim=2, then the attention's transpose to heads-first):

    cos4 = Unsqueeze(Cos(Concat(f, f, axis=-1)), axes=[2])       # [B, T, 1, D]; f = position * inv_freq [B, T, D/2]
    sin4 = Unsqueeze(Sin(Concat(f, f, axis=-1)), axes=[2])
    rot  = Concat(Neg(Slice(x, D/2:D)), Slice(x, 0:D/2), axis=-1)  # x [B, T, H, D]
    y    = Transpose(x * cos4 + rot * sin4, perm=[0, 2, 1, 3])   # [B, H, T, D]

Emits, with the cos/sin halves computed once per f (shared by Q and K of every layer of that type):

    xt = Transpose(x, perm=[0, 2, 1, 3])                          # [B, H, T, D]
    y  = RotaryEmbedding(xt, Cos(f), Sin(f))                      # cos/sin caches [B, T, D/2], full rotation

Both RoPE kinds in DiffusionGemma take this form. "default" (sliding layers): inv_freq = theta^(-2i/D).
"proportional" (full layers, partial_rotary_factor p): transformers still returns cos/sin of the full head
size; inv_freq holds theta^(-2i/D) for the first p*D/2 frequencies and zeros after them, so the remaining
pairs (i, i + D/2) see cos 1 and sin 0 and pass unrotated. That is not ONNX's partial rotation
(`rotary_embedding_dim` rotates the first dims with pairs (i, i + dim/2)), so the node rotates the full head
with the same tables, which is exactly the reference. The check proves the cos/sin tables are two copies of
one frequency vector (the Concat(f, f)): only then does the half-size cache carry the same information.

Why fuse on every target: TensorRT parses RotaryEmbedding into one kernel, and onnxruntime's CPU kernel runs
it faster than the unfused ops with the same result (README, "Measurements behind the passes").
Letters: B batch, T tokens, H heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import pattern

from dllm_trt.errors import DllmError
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import nodes_of

_INT64_MAX = 2**63 - 1

# f -> (cos(f), sin(f)) [B, T, D/2], created once per frequency tensor in the graph being rewritten
CacheFactory = Callable[[ir.Value], tuple[ir.Value, ir.Value]]


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(v) for v in tensor.numpy().reshape(-1)]


def _slice_bounds(value: ir.Value, rank: int) -> tuple[int, int, int, int] | None:
    """(start, end, axis, step) of a single-axis Slice with constant arguments, axis made non-negative."""
    node = value.producer()
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = (_ints(v) for v in inputs[1:5])
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    axes = [0] if inputs[3] is None else axes
    steps = [1] if inputs[4] is None else steps
    if axes is None or steps is None or len(axes) != 1 or len(steps) != 1:
        return None
    return starts[0], ends[0], axes[0] % rank, steps[0]


def _same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Provably equal: the same static size, or the same named symbolic dimension."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _frequencies(table4: ir.Value, kind: str) -> ir.Value | None:
    """f when table4 is Unsqueeze(kind(Concat(f, f, axis=-1)), axes=[2]), else None."""
    unsqueeze = table4.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or _ints(unsqueeze.inputs[1]) != [2]:
        return None
    trig = unsqueeze.inputs[0].producer()
    if trig is None or trig.op_type != kind:
        return None
    concat = trig.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    freqs = concat.inputs[0]
    if concat.inputs[1] is not freqs or freqs.shape is None or concat.attributes.get_int("axis") not in (-1, 2):
        return None
    return freqs


class _RotateHalfRope(pattern.RewriteRuleClassBase):
    def __init__(self, caches: CacheFactory) -> None:
        super().__init__("rotary_embedding")
        self.caches = caches

    def pattern(self, op, x, cos4, sin4, first_start, first_end, second_start, second_end):
        first = op.Slice(x, first_start, first_end, _allow_other_inputs=True, _outputs=["first"])
        second = op.Slice(x, second_start, second_end, _allow_other_inputs=True, _outputs=["second"])
        rotated = op.Concat(op.Neg(second), first, _outputs=["rotated"])
        y = op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))
        return op.Transpose(y, _outputs=["transposed"])

    def check(self, context, x, cos4, sin4, first, second, rotated, transposed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int) or x.shape[3] % 2:
            return result.fail(f"x must be [B, T, H, D] with a static even D; it is {x.shape}", x)
        dim = x.shape[3]
        half = dim // 2
        if list(transposed.producer().attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
            return result.fail("the output transpose is not (0, 2, 1, 3)", transposed)
        if rotated.producer().attributes.get_int("axis") not in (-1, 3):
            return result.fail("rotate_half's Concat is not over the last axis", rotated)
        if _slice_bounds(first, 4) != (0, half, 3, 1):
            return result.fail(f"the first Slice is {_slice_bounds(first, 4)}, not x[..., 0:{half}]", first)
        lower = _slice_bounds(second, 4)
        if lower is None or lower[0] != half or lower[1] < dim or lower[2:] != (3, 1):
            return result.fail(f"the second Slice is {lower}, not x[..., {half}:{dim}]", second)
        freqs = _frequencies(cos4, "Cos")
        if freqs is None or _frequencies(sin4, "Sin") is not freqs:
            return result.fail("cos/sin are not Unsqueeze(Cos|Sin(Concat(f, f)), [2]) of one f", cos4)
        if len(freqs.shape) != 3 or freqs.shape[2] != half:
            return result.fail(f"the frequencies have shape {freqs.shape}, not [B, T, {half}]", freqs)
        if not (_same_dim(freqs.shape[0], x.shape[0]) and _same_dim(freqs.shape[1], x.shape[1])):
            return result.fail(f"frequencies {freqs.shape} and x {x.shape} differ in batch or tokens", freqs)
        return result

    def rewrite(self, op, x, cos4, **_):
        cos_half, sin_half = self.caches(_frequencies(cos4, "Cos"))
        heads_first = op.Transpose(x, perm=[0, 2, 1, 3])  # [B, T, H, D] -> [B, H, T, D]
        return op.RotaryEmbedding(heads_first, cos_half, sin_half, interleaved=0)


def _cache_factory(graph: ir.Graph) -> CacheFactory:
    """Cos(f), Sin(f) inserted right after f is computed, once per f."""
    made: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}

    def caches(freqs: ir.Value) -> tuple[ir.Value, ir.Value]:
        if freqs not in made:
            cos = ir.node("Cos", [freqs])
            sin = ir.node("Sin", [freqs])
            for node, kind in ((cos, "cos"), (sin, "sin")):
                out = node.outputs[0]
                out.name = f"{freqs.name}.{kind}_half"
                out.shape, out.type = ir.Shape(freqs.shape), freqs.type
            producer = freqs.producer()
            if producer is None:
                graph.insert_before(next(iter(graph)), [cos, sin])  # f is a graph input
            else:
                graph.insert_after(producer, [cos, sin])
            made[freqs] = (cos.outputs[0], sin.outputs[0])
        return made[freqs]

    return caches


def fusion_rules(model: ir.Model, ctx: PassContext) -> list[pattern.RewriteRule]:
    del ctx
    return [_RotateHalfRope.rule(_cache_factory(model.graph))]


def fused_nodes(model: ir.Model, ctx: PassContext) -> list[ir.Node]:
    return nodes_of(model, "", "RotaryEmbedding")


def fuse_rotary_embedding(model: ir.Model, ctx: PassContext) -> int:
    """All targets: onnxruntime runs it correctly and faster on CPU; TensorRT parses it since 10.15."""
    version = model.opset_imports.get("", 0)
    if version < 23:
        raise DllmError(f"RotaryEmbedding needs ONNX opset 23; this graph imports opset {version}: re-export it")
    count = pattern.RewriteRuleSet(fusion_rules(model, ctx), commute=True).apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)  # the full-size cos/sin tables and their Unsqueezes
    return count
