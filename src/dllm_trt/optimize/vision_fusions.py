"""The vision tower's RoPE and attention, fused: what `fuse_rotary_embedding` and `fuse_attention` run
on a vision graph (optimize/vision.py).

fuse_axial_rotary. The tower's 2-D RoPE (transformers' apply_multidimensional_rope) rotates each half
of a head by one image axis, each half with rotate-half pairs (i, i + D/4):

    x0, x1 = Split(x, [D/2, D/2], axis=-1)                                  # x [I, P, H, D]
    yk     = xk * Unsqueeze(Split_k(Concat(ch, ch, cw, cw)), [2])
             + Concat(Neg(Slice(xk, D/4:D/2)), Slice(xk, 0:D/4)) * (the same of sin)
    y      = Transpose(Concat(y0, y1, axis=-1), perm)                       # [0,2,1,3] (Q), [0,2,3,1] (K)
    ch, cw = Gather(Cos(f), 0 | 1, axis=2)                                  # f [I, P, 2, D/4]: the axes' angles

Emits one opset-23 RotaryEmbedding per half, each over its axis's half-size tables (ch, cw: the
[I, P, D/4] caches the node wants, computed once by the export and shared by every layer):

    h0, h1 = Split(Transpose(x, [0,2,1,3]), [D/2, D/2], axis=3)             # [I, H, P, D/2]
    y      = Concat(RotaryEmbedding(h0, ch, sh), RotaryEmbedding(h1, cw, sw), axis=3)   # [I, H, P, D]
             (then Transpose(y, [0,1,3,2]) where the export had merged K's transposes into [0,2,3,1])

fuse_vision_attention. Where the tower has no grouped heads the exporter merges K's two transposes
(heads-first, then keys-last) into one Transpose(k, [0,2,3,1]); it is split back into the two, and
the step's attention rules (optimize.attention) then match the tower's eager attention as they match
the step's: one opset-23 Attention node per layer, the key-padding bias expanded to the patch rows.
Letters: I images, P patches, H heads, D head dim.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import pattern

from dllm_trt.optimize.attention import fuse_attention
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.rotary import _ints, _slice_bounds

HEADS_FIRST, KEYS_LAST = [0, 2, 1, 3], [0, 2, 3, 1]


def _axis_table(table4: ir.Value, kind: str, axis: int) -> ir.Value | None:
    """The half-size table g of one axis when table4 is Unsqueeze(Split_axis(Concat(g0, g0, g1, g1)), [2])
    with g_a = Gather(kind(f), a, axis=2); else None."""
    unsqueeze = table4.producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or _ints(unsqueeze.inputs[1]) != [2]:
        return None
    split = unsqueeze.inputs[0].producer()
    if split is None or split.op_type != "Split" or list(split.outputs).index(unsqueeze.inputs[0]) != axis:
        return None
    concat = split.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 4:
        return None
    first, second = concat.inputs[0], concat.inputs[2]
    if concat.inputs[1] is not first or concat.inputs[3] is not second:
        return None
    table = (first, second)[axis]
    gather = table.producer()
    if gather is None or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0) not in (2, -2):
        return None
    index = ir.convenience.get_const_tensor(gather.inputs[1])
    trig = gather.inputs[0].producer()
    if index is None or int(index.numpy().reshape(-1)[0]) != axis or trig is None or trig.op_type != kind:
        return None
    return table


def _angles(table: ir.Value) -> ir.Value:
    """f of a table Gather(Cos|Sin(f), a, axis=2)."""
    return table.producer().inputs[0].producer().inputs[0]


class _AxialRope(pattern.RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__("axial_rotary_embedding")

    @staticmethod
    def _rotate(op, half, cos4, sin4, k: int):  # noqa: ANN001, ANN205
        first = op.Slice(half, _allow_other_inputs=True, _outputs=[f"first{k}"])
        second = op.Slice(half, _allow_other_inputs=True, _outputs=[f"second{k}"])
        rotated = op.Concat(op.Neg(second), first, _outputs=[f"rotated{k}"])
        return op.Add(op.Mul(half, cos4), op.Mul(rotated, sin4))

    def pattern(self, op, x, cos0, sin0, cos1, sin1):  # noqa: ANN001, ANN201
        half0, half1 = op.Split(x, _allow_other_inputs=True, _outputs=["half0", "half1"])
        joined = op.Concat(
            self._rotate(op, half0, cos0, sin0, 0), self._rotate(op, half1, cos1, sin1, 1), _outputs=["joined"]
        )
        return op.Transpose(joined, _outputs=["transposed"])

    def check(self, context, x, half0, half1, joined, transposed, cos0, sin0, cos1, sin1, **bound):  # noqa: ANN001, ANN201
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int) or x.shape[3] % 4:
            return result.fail(f"x must be [I, P, H, D] with a static D divisible by 4; it is {x.shape}", x)
        dim = x.shape[3]
        half, quarter = dim // 2, dim // 4
        split = half0.producer()
        if split.attributes.get_int("axis", 0) not in (3, -1) or any(
            h.shape is None or h.shape[3] != half for h in (half0, half1)
        ):
            return result.fail(f"the Split does not cut the head dim {dim} into two halves", half0)
        if joined.producer().attributes.get_int("axis") not in (-1, 3):
            return result.fail("the halves are not joined along the head dim", joined)
        perm = list(transposed.producer().attributes.get_ints("perm", []))
        if perm not in (HEADS_FIRST, KEYS_LAST):
            return result.fail(f"the output transpose is {perm}, not {HEADS_FIRST} or {KEYS_LAST}", transposed)
        for k in (0, 1):
            if _slice_bounds(bound[f"first{k}"], 4) != (0, quarter, 3, 1):
                return result.fail(f"half {k}: the first Slice is not x[..., 0:{quarter}]", bound[f"first{k}"])
            lower = _slice_bounds(bound[f"second{k}"], 4)
            if lower is None or lower[0] != quarter or lower[1] < half or lower[2:] != (3, 1):
                return result.fail(f"half {k}: the second Slice is {lower}, not x[..., {quarter}:{half}]", x)
            if bound[f"rotated{k}"].producer().attributes.get_int("axis") not in (-1, 3):
                return result.fail(f"half {k}: rotate_half's Concat is not over the last axis", x)
        tables = [_axis_table(t, kind, k) for t, kind, k in ((cos0, "Cos", 0), (sin0, "Sin", 0), (cos1, "Cos", 1),
                                                              (sin1, "Sin", 1))]  # fmt: skip
        if any(t is None for t in tables):
            return result.fail("cos/sin are not the axes' tables Unsqueeze(Split(Concat(a, a, b, b)))", cos0)
        if len({id(_angles(t)) for t in tables}) != 1:
            return result.fail("cos and sin are not of the same angles", cos0)
        if tables[0].shape is None or len(tables[0].shape) != 3 or tables[0].shape[2] != quarter:
            return result.fail(f"the axis tables have shape {tables[0].shape}, not [I, P, {quarter}]", cos0)
        return result

    def rewrite(self, op, x, transposed, cos0, sin0, cos1, sin1, **_):  # noqa: ANN001, ANN201
        half = x.shape[3] // 2
        tables = [_axis_table(t, kind, k) for t, kind, k in ((cos0, "Cos", 0), (sin0, "Sin", 0), (cos1, "Cos", 1),
                                                              (sin1, "Sin", 1))]  # fmt: skip
        heads_first = op.Transpose(x, perm=HEADS_FIRST)  # [I, P, H, D] -> [I, H, P, D]
        sizes = op.Constant(value_ints=[half, half])
        h0, h1 = op.Split(heads_first, sizes, axis=3, _outputs=2)
        r0 = op.RotaryEmbedding(h0, tables[0], tables[1], interleaved=0)
        r1 = op.RotaryEmbedding(h1, tables[2], tables[3], interleaved=0)
        out = op.Concat(r0, r1, axis=3)  # [I, H, P, D]
        images, patches, heads, dim = x.shape
        # typed and shaped, so that the attention rule after this pass can prove its operands' layout
        for value, shape in ((h0, [images, heads, patches, half]), (h1, [images, heads, patches, half]), (r0, None),
                             (r1, None), (out, [images, heads, patches, dim])):  # fmt: skip
            value.type, value.shape = x.type, ir.Shape(shape or h0.shape)
        if list(transposed.producer().attributes.get_ints("perm", [])) == KEYS_LAST:
            out = op.Transpose(out, perm=[0, 1, 3, 2])  # keys last, as the export's merged transpose left them
            out.type, out.shape = x.type, ir.Shape([images, heads, dim, patches])
        return out


def fuse_axial_rotary(model: ir.Model, ctx: PassContext) -> int:  # noqa: ARG001
    """Returns the number of (Q or K) 2-D RoPEs fused, two RotaryEmbedding nodes each."""
    count = pattern.RewriteRuleSet([_AxialRope.rule()], commute=True).apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)  # the full-size tables and their Concat/Split/Unsqueeze
    return count


class _MergedKeyTranspose(pattern.RewriteRuleClassBase):
    """MatMul(q, Transpose(k, [0,2,3,1])) -> MatMul(q, Transpose(Transpose(k, [0,2,1,3]), [0,1,3,2]))."""

    def __init__(self) -> None:
        super().__init__("split_merged_key_transpose")

    def pattern(self, op, query, key):  # noqa: ANN001, ANN201
        return op.MatMul(query, op.Transpose(key, _outputs=["keys_t"]))

    def check(self, context, query, key, keys_t, **_) -> pattern.MatchResult:  # noqa: ANN001
        result = pattern.MatchResult()
        if list(keys_t.producer().attributes.get_ints("perm", [])) != KEYS_LAST:
            return result.fail("not a merged heads-first and keys-last transpose", keys_t)
        return result

    def rewrite(self, op, query, key, keys_t, **_):  # noqa: ANN001, ANN201
        heads_first = op.Transpose(key, perm=HEADS_FIRST)  # [I, P, H, D] -> [I, H, P, D]
        if key.shape is not None and len(key.shape) == 4:
            images, patches, heads, dim = key.shape
            heads_first.type, heads_first.shape = key.type, ir.Shape([images, heads, patches, dim])
        keys_last = op.Transpose(heads_first, perm=[0, 1, 3, 2])
        keys_last.type, keys_last.shape = keys_t.type, keys_t.shape
        return op.MatMul(query, keys_last)


def fuse_vision_attention(model: ir.Model, ctx: PassContext) -> int:
    """Returns the number of Attention nodes made (one per tower layer when every layer fuses)."""
    pattern.RewriteRuleSet([_MergedKeyTranspose.rule()]).apply_to_model(model)
    return fuse_attention(model, ctx)
