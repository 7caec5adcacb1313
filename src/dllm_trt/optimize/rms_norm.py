"""fuse_rms_norm: transformers' RMSNorm, as the exporter writes it, becomes one opset-23 RMSNormalization.

Matches (DiffusionGemmaRMSNorm._norm, torch.pow rather than rsqrt):

    normalized = x * Pow(Add(ReduceMean(Pow(x, 2), axes=[-1]), eps), -0.5)
    y          = normalized * weight                # with_scale=True; weight a constant [D]
    y          = normalized                         # with_scale=False (attention v_norm, the router's
                                                    # norm, the self-conditioning post_norm)

and the reduced-precision form of the same module (`hidden.float()` ... `.type_as(hidden)`), where x is
float16/bfloat16 and the weight is a float32 constant the exporter folded from `weight.float()`:

    y = Cast(Cast(x, float) * Pow(...(Cast(x, float))...) [* weight_f32], to=x.dtype)

Emits `RMSNormalization(x, scale, axis=-1, epsilon=eps, stash_type=1)`: scale is the weight, or a ones
initializer [D] for a weightless norm (TensorRT's parser wants the scale input). In the reduced-precision
form the scale is the weight in x's dtype (refused when the float32 weight does not round-trip), and the
fused node rounds the normalized value to x's dtype before the scale multiply, where the reference
multiplies in float32 and rounds once: at most one extra rounding step, well inside that dtype's tolerance.

Shared normalized values: the exporter's CSE lets one `normalized` feed several consumers (the router's
`* scale` and `pre_feedforward_layernorm_2`'s `* weight`; in full layers with K = V, k_norm's `* weight`
and v_norm's weightless use). The rules keep the matched nodes (`remove_nodes=False`), so every consumer
gets its own RMSNormalization and the orphaned chain is removed afterwards: the norm is recomputed per
consumer, which is cheap next to a separate normalize-then-scale round trip through memory.

Rules run in four ordered phases because a float32 rule would otherwise match the inside of a
reduced-precision norm (the cast-back node comes last in topological order), and a weightless rule the
inside of a weighted one. The count is the number of RMSNormalization nodes emitted.
Letters: D the normalized (last) dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from dllm_trt.contract import derived_name
from dllm_trt.errors import DllmError
from dllm_trt.optimize.context import PassContext
from dllm_trt.optimize.fusion_census import nodes_of

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
_LOW_PRECISION = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

# (dtype, ndarray, name hint) -> an initializer value in the graph being rewritten (shared, created once)
ScaleFactory = Callable[[ir.DataType, np.ndarray, str], ir.Value]


def _scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _constant(value: ir.Value) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


class _RmsNorm(pattern.RewriteRuleClassBase):
    """One variant: float32 or reduced precision, with or without a weight."""

    def __init__(self, name: str, low_precision: bool, weighted: bool, scales: ScaleFactory) -> None:
        # remove_nodes=False: a shared `normalized` keeps its other consumers; dead nodes go afterwards.
        super().__init__(name, remove_nodes=False)
        self.low_precision = low_precision
        self.weighted = weighted
        self.scales = scales

    def pattern(self, op, x, exponent, axes, epsilon, minus_half, weight, to_float, to_back):
        xf = op.Cast(x, to=to_float) if self.low_precision else x
        mean_square = op.ReduceMean(op.Pow(xf, exponent), axes, _outputs=["mean_square"])
        normalized = op.Mul(xf, op.Pow(op.Add(mean_square, epsilon), minus_half))
        y = op.Mul(normalized, weight) if self.weighted else normalized
        return op.Cast(y, to=to_back) if self.low_precision else y

    def check(self, context, x, exponent, axes, epsilon, minus_half, mean_square, weight=None, to_float=None,
              to_back=None, **_) -> pattern.MatchResult:  # fmt: skip
        result = pattern.MatchResult()
        if x.dtype not in (_LOW_PRECISION if self.low_precision else _FLOAT_TYPES):
            return result.fail(f"x has dtype {x.dtype}, not one this variant handles", x)
        if self.low_precision:
            if to_float.as_int() != ir.DataType.FLOAT or to_back.as_int() != x.dtype:
                return result.fail("the casts are not x -> float32 -> x's dtype", x)
        if _scalar(exponent) != 2.0:
            return result.fail(f"the squaring Pow has exponent {_scalar(exponent)}, not 2", exponent)
        if _scalar(minus_half) != -0.5:
            return result.fail(f"the reciprocal root Pow has exponent {_scalar(minus_half)}, not -0.5", minus_half)
        eps = _scalar(epsilon)
        if eps is None:
            return result.fail("epsilon is not a constant scalar", epsilon)
        dim = _last_dim(x)
        if dim is None:
            return result.fail("the last dimension of x is not static (the scale needs it)", x)
        rank = len(x.shape)
        axes_value = _constant(axes)
        if axes_value is None or [int(a) % rank for a in axes_value.reshape(-1)] != [rank - 1]:
            return result.fail(f"ReduceMean is over axes {axes_value}, not the last axis only", axes)
        if mean_square.producer().attributes.get_int("keepdims", 1) != 1:
            return result.fail("ReduceMean has keepdims=0", mean_square)
        if self.weighted:
            w = _constant(weight)
            if w is None:
                return result.fail("the scale is not a constant", weight)
            if w.shape != (dim,):
                return result.fail(f"the scale has shape {w.shape}, not [{dim}]", weight)
            expected = ir.DataType.FLOAT if self.low_precision else x.dtype
            if weight.dtype != expected:
                return result.fail(f"the scale is {weight.dtype}, x computes in {expected}", weight)
            if self.low_precision and not np.array_equal(w, w.astype(x.dtype.numpy()).astype(np.float32)):
                return result.fail(f"the float32 scale does not round-trip through {x.dtype}", weight)
        return result

    def rewrite(self, op, x, epsilon, weight=None, **_):
        dim = _last_dim(x)
        if not self.weighted:
            scale = self.scales(x.dtype, np.ones(dim, dtype=np.float32), f"rms_norm.ones_{dim}")
        elif self.low_precision:
            scale = self.scales(x.dtype, _constant(weight), weight.name)
        else:
            scale = weight
        return op.RMSNormalization(x, scale, axis=-1, epsilon=_scalar(epsilon), stash_type=1)


def _scale_factory(graph: ir.Graph) -> ScaleFactory:
    """Initializers the rules need (ones, a weight in x's dtype), created once per graph and reused."""

    def scale(dtype: ir.DataType, values: np.ndarray, hint: str) -> ir.Value:
        name = derived_name(hint, dtype.name.lower())
        existing = graph.initializers.get(name)
        if existing is not None:
            return existing
        tensor = ir.tensor(values.astype(dtype.numpy()), dtype=dtype, name=name)
        value = ir.Value(name=name, shape=ir.Shape(values.shape), type=ir.TensorType(dtype), const_value=tensor)
        graph.register_initializer(value)
        return value

    return scale


def _require_opset_23(model: ir.Model) -> None:
    version = model.opset_imports.get("", 0)
    if version < 23:
        raise DllmError(f"RMSNormalization needs ONNX opset 23; this graph imports opset {version}: re-export it")


def fusion_rules(model: ir.Model, ctx: PassContext) -> list[pattern.RewriteRule]:
    """The variants in the order fuse_rms_norm applies them: the larger patterns first."""
    del ctx
    scales = _scale_factory(model.graph)
    phases = [
        ("rms_norm_low_precision_weighted", True, True),
        ("rms_norm_low_precision", True, False),
        ("rms_norm_weighted", False, True),
        ("rms_norm", False, False),
    ]
    return [_RmsNorm.rule(name, low_precision, weighted, scales) for name, low_precision, weighted in phases]


def fused_nodes(model: ir.Model, ctx: PassContext) -> list[ir.Node]:
    return nodes_of(model, "", "RMSNormalization")


def fuse_rms_norm(model: ir.Model, ctx: PassContext) -> int:
    """All targets: TensorRT parses RMSNormalization since 10.15, onnxruntime runs it on CPU and CUDA."""
    _require_opset_23(model)
    # one variant at a time, so that a smaller variant never takes part of a larger one's match
    return sum(pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model) for rule in fusion_rules(model, ctx))
