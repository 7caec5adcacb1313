"""fuse_attention: the eager attention of the exported graphs becomes one opset-23 Attention node.

Matches (transformers' eager_attention_forward as models/diffusion_gemma.attend writes it), starting after
the KV concatenation:

    K, V   = Concat(past_key, key, axis=2), Concat(past_value, value, axis=2)   # [B, Hkv, S, D]  (outside)
    Kr     = Reshape(Expand(Unsqueeze(K, [2]), [B, Hkv, n, S, D]), [B, Hq, S, D])  # repeat_kv, n = Hq / Hkv;
    Vr     = the same for V                                                      # absent when Hkv == Hq
    scores = MatMul(Q, Transpose(Kr, perm=[0, 1, 3, 2]))                         # [B, Hq, T, S]
    scores = scores * scale  |  scores / scale  |  scores                        # (DiffusionGemma: scale 1)
    probs  = Softmax(scores + bias, axis=-1)                                     # bias [B, 1, T, S] additive
             | Cast(Softmax(Cast(scores + bias, float), -1), to=Q's dtype)       # reduced-precision export
    out    = MatMul(probs, Vr)                                                   # [B, Hq, T, D]

Emits `Attention(Q, K, V, bias, scale=scale, is_causal=0)` with 4D inputs (Q [B, Hq, T, D], K/V the
Concat outputs [B, Hkv, S, D]: grouped-query attention inside the node, no repeated K/V in memory), output
[B, Hq, T, D]; `softmax_precision=1` when the softmax ran in float32 behind casts (not for TensorRT, whose
parser rejects the attribute). The causal, sliding
window and padding structure stays in the additive bias, built once per layer type, so one node form serves
the causal encoder pass and the bidirectional denoise step. The KV concatenation stays outside: TensorRT's parser takes
only Attention's first output and rejects past_key/past_value inputs. The transpose/reshape to [B, T, Hq*D]
and o_proj after the node are untouched.

The op per target (the measurements behind the choice: README, "Measurements behind the passes"):
- "trt": opset-23 Attention, parsed into IAttention (TensorRT >= 10.14), where TensorRT has a fused kernel for
  the graph's final dtype and the head size (trt.support.fuses_attention: fp16/bf16, heads 16..256); elsewhere
  (the released full layers' head 512, every fp32 attention) `dllm_trt::DllmAttention` with the same inputs
  and `scale`, the plugin of trt.attention_plugin, whose kernels never write the scores to memory
  (TensorRT would decompose such a node into GEMM, softmax, GEMM, the scores in between in memory).
- "ort-cpu": opset-23 Attention: the fastest of the candidates in every shape measured (it is GQA-aware, the
  contrib MultiHeadAttention needs the repeated K/V and was no faster than the eager ops), and correct.
  com.microsoft GroupQueryAttention is not usable here: with past context and more than one query token
  it requires batch 1 ("batch_size must be 1 when sequence_length > 1 and past context is given").
- "ort-cuda": opset-23 Attention, chosen from the documentation (no GPU here): onnxruntime's CUDA kernel for it
  dispatches to flash / memory-efficient / unfused attention with grouped-query heads and float masks, falls
  back to unfused for head dims the fused kernels cannot hold (full layers: 512); MultiHeadAttention has no
  grouped-query heads and GroupQueryAttention the batch restriction above.

Fully masked query rows (left-padding queries in the encoder, every bias entry the dtype's lowest value):
the eager graph averages V over them; onnxruntime's Attention returns zeros. Both are finite; such rows are
padding, their K/V are masked by cache_mask in every later call, and parity ignores them.
Letters: B batch, T queries, S keys (cache + new), Hq query heads, Hkv key/value heads, n = Hq / Hkv,
D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import pattern

from dllm_trt.contract import (
    ATTENTION_OP,
    ATTENTION_SCALE,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    PRECISION_DTYPES,
    TARGETS,
)
from dllm_trt.errors import DllmError
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import nodes_of

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

# (bias [B, 1, 1, S], T) -> bias expanded to [B, 1, T, S], once per bias in the graph being rewritten
MaskFactory = Callable[[ir.Value, int], ir.Value]
# head size -> whether its attention becomes the DllmAttention plugin node (None: never)
PluginRule = Callable[[int], bool] | None
_TRT_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}  # contract dtypes -> trt.support's names


def plugin_rule(target: str, precision: str) -> PluginRule:
    """The trt target's rule: the plugin where TensorRT has no fused kernel for the graph's final dtype
    (the precision's, contract.PRECISION_DTYPES) and the head size."""
    if target != "trt":
        return None
    from dllm_trt.trt.support import fuses_attention

    dtype = _TRT_TYPES[PRECISION_DTYPES[precision]]
    return lambda head_size: not fuses_attention(dtype, head_size)


def _dims(value: ir.Value | None) -> list | None:
    return None if value is None or value.shape is None else list(value.shape)


def _same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Provably equal: the same static size, or the same named symbolic dimension."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _static(dim: int | ir.SymbolicDim) -> int | None:
    return dim if isinstance(dim, int) else None


def _scalar(value: ir.Value) -> float | None:
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _target_shape(value: ir.Value) -> list | None:
    """The shape a repeat_kv Expand/Reshape produced: from shape inference, else from a constant shape input."""
    dims = _dims(value)
    if dims is not None:
        return dims
    tensor = ir.convenience.get_const_tensor(value.producer().inputs[1])
    return None if tensor is None else [int(d) for d in tensor.numpy().reshape(-1)]


def _repeat_failure(
    source: ir.Value, unsqueezed: ir.Value, expanded: ir.Value, repeated: ir.Value, q_heads: int
) -> str | None:
    """Why Reshape(Expand(Unsqueeze(source, [2]))) is not repeat_kv from Hkv to q_heads heads, or None."""
    axes = ir.convenience.get_const_tensor(unsqueezed.producer().inputs[1])
    if axes is None or [int(a) for a in axes.numpy().reshape(-1)] not in ([2], [-3]):
        return "repeat_kv's Unsqueeze is not on axis 2"
    kv_heads = _static(_dims(source)[1])
    expand, reshape = _target_shape(expanded), _target_shape(repeated)
    if expand is None or reshape is None or len(expand) != 5 or len(reshape) != 4:
        return "cannot read repeat_kv's Expand/Reshape shapes"
    if kv_heads is None or _static(expand[1]) != kv_heads or _static(expand[2]) != q_heads // kv_heads:
        return f"repeat_kv's Expand is {expand}, not [B, {kv_heads}, {q_heads // (kv_heads or 1)}, S, D]"
    if _static(reshape[1]) != q_heads:
        return f"repeat_kv's Reshape gives {reshape[1]} heads, not {q_heads}"
    return None


def _mask_factory(graph: ir.Graph) -> MaskFactory:
    """Bias [B, 1, 1, S] expanded to [B, 1, T, S] right after it is built, once per bias and T.

    The Attention spec lets attn_mask broadcast over the query rows, but onnxruntime 1.32 (CPU) rejects a
    mask whose row count is not T, and TensorRT's IAttention broadcasts only the batch and head axes.
    """
    made: dict[tuple[ir.Value, int], ir.Value] = {}

    def expanded(bias: ir.Value, queries: int) -> ir.Value:
        if (bias, queries) not in made:
            name = f"{bias.name}.rows_{queries}"
            rows = ir.tensor(np.array([1, 1, queries, 1], dtype=np.int64), name=f"{name}.shape")
            shape = ir.Value(name=rows.name, shape=ir.Shape([4]), type=ir.TensorType(rows.dtype), const_value=rows)
            graph.register_initializer(shape)
            node = ir.node("Expand", [bias, shape])
            out = node.outputs[0]
            out.name, out.type = name, bias.type
            out.shape = ir.Shape([bias.shape[0], bias.shape[1], queries, bias.shape[3]])
            producer = bias.producer()
            if producer is None:
                graph.insert_before(next(iter(graph)), node)  # the bias is a graph input
            else:
                graph.insert_after(producer, node)
            made[(bias, queries)] = out
        return made[(bias, queries)]

    return expanded


class _EagerAttention(pattern.RewriteRuleClassBase):
    """One variant of the eager pattern: repeat_kv or not, how the scale is applied, softmax casts or not."""

    def __init__(
        self, repeat: bool, scaling: str, softmax_cast: bool, masks: MaskFactory, softmax_precision: bool = True,
        plugin: PluginRule = None,
    ) -> None:  # fmt: skip
        self.masks, self.plugin = masks, plugin
        name = f"attention{'_repeat_kv' if repeat else ''}{'_' + scaling if scaling != 'none' else ''}"
        super().__init__(name + ("_cast_softmax" if softmax_cast else ""))
        self.repeat, self.scaling, self.softmax_cast = repeat, scaling, softmax_cast
        self.softmax_precision = softmax_precision  # TensorRT's parser rejects the attribute

    def _repeat(self, op, x, prefix: str):
        unsqueezed = op.Unsqueeze(x, _allow_other_inputs=True, _outputs=[f"{prefix}_unsqueezed"])
        expanded = op.Expand(unsqueezed, _allow_other_inputs=True, _outputs=[f"{prefix}_expanded"])
        return op.Reshape(expanded, _allow_other_inputs=True, _outputs=[f"{prefix}_repeated"])

    def pattern(self, op, query, key, value, bias, scale, to_float, to_back):
        keys = self._repeat(op, key, "key") if self.repeat else key
        values = self._repeat(op, value, "value") if self.repeat else value
        scores = op.MatMul(query, op.Transpose(keys, _outputs=["keys_t"]))
        if self.scaling == "mul":
            scores = op.Mul(scores, scale)
        elif self.scaling == "div":
            scores = op.Div(scores, scale)
        scores = op.Add(scores, bias, _outputs=["biased"])
        if self.softmax_cast:
            probs = op.Cast(op.Softmax(op.Cast(scores, to=to_float), _outputs=["probs"]), to=to_back)
        else:
            probs = op.Softmax(scores, _outputs=["probs"])
        return op.MatMul(probs, values)

    def check(
        self, context, query, key, value, bias, probs, keys_t, scale=None, to_float=None, to_back=None, **bound
    ) -> pattern.MatchResult:
        result = pattern.MatchResult()
        q, k, v = _dims(query), _dims(key), _dims(value)
        if q is None or k is None or v is None or len(q) != 4 or len(k) != 4 or len(v) != 4:
            return result.fail("Q, K and V must be 4D [B, H, T|S, D] with known rank", query)
        if query.dtype not in _FLOAT_TYPES or key.dtype != query.dtype or value.dtype != query.dtype:
            return result.fail(f"Q/K/V dtypes {query.dtype}/{key.dtype}/{value.dtype} are not one float type", key)
        q_heads, kv_heads = _static(q[1]), _static(k[1])
        if q_heads is None or kv_heads is None or _static(v[1]) != kv_heads:
            return result.fail(f"head counts must be static and equal for K and V: Q {q}, K {k}, V {v}", key)
        if q_heads % kv_heads:
            return result.fail(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads", key)
        if list(keys_t.producer().attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
            return result.fail("K is not transposed with perm (0, 1, 3, 2)", keys_t)
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, 3):
            return result.fail(f"Softmax is over axis {axis}, not the key axis", probs)
        if self.repeat:
            for prefix, source in (("key", key), ("value", value)):
                why = _repeat_failure(
                    source,
                    bound[f"{prefix}_unsqueezed"],
                    bound[f"{prefix}_expanded"],
                    bound[f"{prefix}_repeated"],
                    q_heads,
                )
                if why:
                    return result.fail(f"{prefix}: {why}", source)
        elif kv_heads not in (1, q_heads):
            return result.fail(f"no repeat_kv but {kv_heads} key/value heads for {q_heads} query heads", key)
        if self.scaling != "none" and not _scalar(scale):
            return result.fail("the score scale is not a non-zero constant scalar", scale)
        b = _dims(bias)
        if bias.dtype != query.dtype or b is None or len(b) != 4:
            return result.fail(f"the mask bias must be 4D {query.dtype}; it is {bias.dtype} {b}", bias)
        if _static(b[1]) not in (1, q_heads):
            return result.fail(f"the mask bias has {b[1]} heads, not 1 or {q_heads}", bias)
        if not _same_dim(b[3], k[2]):
            return result.fail(f"cannot prove the mask bias covers the {k[2]} keys: it has {b[3]}", bias)
        if not (_same_dim(b[2], q[2]) or (_static(b[2]) == 1 and _static(q[2]) is not None)):
            return result.fail(f"the mask bias has {b[2]} query rows for {q[2]} queries (static T needed)", bias)
        if self.softmax_cast and (to_float.as_int() != ir.DataType.FLOAT or to_back.as_int() != query.dtype):
            return result.fail("the softmax casts are not to float32 and back to Q's dtype", probs)
        return result

    def rewrite(self, op, query, key, value, bias, scale=None, **_):
        factor = 1.0
        if self.scaling == "mul":
            factor = _scalar(scale)
        elif self.scaling == "div":
            factor = 1.0 / _scalar(scale)
        extra = {"softmax_precision": int(ir.DataType.FLOAT)} if self.softmax_cast and self.softmax_precision else {}
        if not _same_dim(bias.shape[2], query.shape[2]):
            bias = self.masks(bias, query.shape[2])  # [B, 1, 1, S] -> [B, 1, T, S]
        head_size = _static(query.shape[3])
        if self.plugin is not None and head_size is not None and self.plugin(head_size):
            # the same inputs for the plugin (contract.ATTENTION_INPUTS); no type inference for it: Q's type
            out = op.op(
                ATTENTION_OP, query, key, value, bias, _domain=PLUGIN_NAMESPACE, plugin_namespace=PLUGIN_NAMESPACE,
                plugin_version=PLUGIN_VERSION, **{ATTENTION_SCALE: factor},
            )  # fmt: skip
            out.type, out.shape = query.type, query.shape
            return out
        # Q [B, Hq, T, D], K/V [B, Hkv, S, D], bias [B, 1, T, S] -> [B, Hq, T, D]
        return op.Attention(query, key, value, bias, scale=factor, is_causal=0, **extra)


def attention_rules(
    masks: MaskFactory, softmax_precision: bool = True, plugin: PluginRule = None
) -> list[pattern.RewriteRule]:
    return [
        _EagerAttention.rule(repeat, scaling, cast, masks, softmax_precision, plugin)
        for repeat in (True, False)
        for scaling in ("none", "mul", "div")
        for cast in (False, True)
    ]


def fusion_rules(model: ir.Model, ctx: PassContext) -> list[pattern.RewriteRule]:
    """The rules fuse_attention applies to `model` for `ctx.target` (also the fusion census's)."""
    plugin = plugin_rule(ctx.target, ctx.precision)
    return attention_rules(_mask_factory(model.graph), softmax_precision=ctx.target != "trt", plugin=plugin)


def fused_nodes(model: ir.Model, ctx: PassContext) -> list[ir.Node]:
    """Both forms an attention fuses into: opset-23 Attention, or the plugin where TensorRT fuses no kernel."""
    return nodes_of(model, "", "Attention") + nodes_of(model, PLUGIN_NAMESPACE, ATTENTION_OP)


def fuse_attention(model: ir.Model, ctx: PassContext) -> int:
    """Every target gets opset-23 Attention, the trt target the DllmAttention plugin where TensorRT fuses
    no attention (see the module docstring for the measurements behind it)."""
    if ctx.target not in TARGETS:
        raise DllmError(f"unknown target {ctx.target!r}: use one of {', '.join(TARGETS)}")
    version = model.opset_imports.get("", 0)
    if version < 23:
        raise DllmError(f"Attention needs ONNX opset 23; this graph imports opset {version}: re-export it")
    count = pattern.RewriteRuleSet(fusion_rules(model, ctx), commute=True).apply_to_model(model)
    if any(node.op_type == ATTENTION_OP for node in model.graph):
        model.opset_imports.setdefault(PLUGIN_NAMESPACE, 1)
    common_passes.RemoveUnusedNodesPass()(model)  # repeat_kv's shape arithmetic
    return count
