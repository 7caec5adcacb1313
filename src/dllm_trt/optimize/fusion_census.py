"""Every fusion counted against the model: how many of an op the model runs, how many fused, and why not.

A fusion's rule that fails quietly leaves a layer in its unfused form: correct, but an unfused MoE runs
every token through every expert (tens of times the work) and an unfused attention writes its scores to
memory. So each fusing pass is judged against the census export took of the model's own modules
(`models.diffusion_gemma.fusible_ops`): per layer, the fused nodes are counted, and for each layer short
of its count the rule's own fail reason is found again (a tracer over the same rules, which sees every
partial match and keeps the best one per layer).

A node's layer is its place in the graph: the exporter writes the layers in order and every rewrite
keeps a weight named after its checkpoint tensor (contract.layer_of), so a node belongs to the layer of
the last layer weight read at or before it, or to OUTSIDE_LAYERS once a weight outside the layers (the
embedding, the self-conditioning block, the final norm) is read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, pattern

from dllm_trt.contract import OUTSIDE_LAYERS, layer_of
from dllm_trt.errors import DllmError
from dllm_trt.optimize.context import PassContext

RulesFn = Callable[[ir.Model, PassContext], Sequence[pattern.RewriteRule]]
FusedFn = Callable[[ir.Model, PassContext], list[ir.Node]]  # the nodes the pass fused, one per fused op
CHECKPOINT_PREFIX = "model."  # weights named after checkpoint tensors; exporter constants are not


@dataclass(frozen=True)
class Census:
    """What a fusing pass is counted by: the op in the model's census, the nodes it emits, its rules."""

    op: str  # a key of manifest["model"]["fusible_ops"]
    fused: FusedFn
    rules: RulesFn | None = None  # None: a pass with no pattern (its miss has no rule reason to give)


@dataclass
class Miss:
    layer: str  # "0".."L-1" or OUTSIDE_LAYERS
    expected: int
    fused: int
    reason: str

    def line(self, op: str) -> str:
        where = "outside the layers" if self.layer == OUTSIDE_LAYERS else f"layer {self.layer}"
        return f"{op} {where}: {self.fused} of {self.expected} fused: {self.reason}"


@dataclass
class FusionCount:
    op: str
    expected: int
    fused: int
    misses: list[Miss] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(op=self.op, expected=self.expected, fused=self.fused,
                    misses=[dict(layer=m.layer, expected=m.expected, fused=m.fused, reason=m.reason)
                            for m in self.misses])  # fmt: skip


def nodes_of(model: ir.Model, domain: str, op_type: str) -> list[ir.Node]:
    """The top-level nodes of one op (domain "" for ONNX's own)."""
    domains = (domain,) if domain else ("", "ai.onnx")
    return [node for node in model.graph if node.op_type == op_type and (node.domain or "") in domains]


def node_layers(graph: ir.Graph) -> dict[ir.Node, str]:
    """Each top-level node's layer ("0".."L-1") or OUTSIDE_LAYERS, from the weights read up to it."""
    layers: dict[ir.Node, str] = {}
    current = OUTSIDE_LAYERS
    for node in graph:
        for value in node.inputs:
            if value is None or not value.is_initializer() or not (value.name or "").startswith(CHECKPOINT_PREFIX):
                continue
            layer = layer_of(value.name)
            current = OUTSIDE_LAYERS if layer is None else str(layer)
        layers[node] = current
    return layers


class _EveryMatch(MatchingTracer):
    """Keeps, per root node, the best partial match any rule made (the stock tracer keeps the best overall)."""

    def __init__(self) -> None:
        super().__init__()
        self.best: dict[ir.Node, tuple[int, str]] = {}

    def log(self, rule, container, node, match_result, status) -> None:  # noqa: ANN001
        if status == MatchStatus.SUCCESS:
            return
        score = len(match_result.nodes) + int(status.value) * 100
        if score and score > self.best.get(node, (0, ""))[0]:
            reason = match_result.reason or "the pattern did not match"
            self.best[node] = (score, f"{rule.name}: {reason}" if getattr(rule, "name", None) else reason)


def rule_misses(model: ir.Model, rules: Sequence[pattern.RewriteRule]) -> dict[ir.Node, tuple[int, str]]:
    """Per root node where a rule matched part of its pattern: (how far it got, the rule's reason).

    Run after the pass: nothing the rules match is left, so this finds the reasons and changes nothing."""
    tracer = _EveryMatch()
    pattern.RewriteRuleSet(list(rules), commute=True).apply_to_model(model, tracer=tracer)
    return tracer.best


def count_fusions(model: ir.Model, ctx: PassContext, census: Census) -> FusionCount:
    """How many of `census.op` the model has and how many are fused in `model`, with each layer's miss."""
    expected_by_layer: dict[str, int] = ctx.model.get("fusible_ops", {}).get(census.op)
    if expected_by_layer is None:
        raise DllmError(
            "the export's manifest has no census of the model's fusible ops (made by an older dllm-trt): "
            "re-run 'dllm-trt export'"
        )
    layers = node_layers(model.graph)
    fused: dict[str, int] = defaultdict(int)
    for node in census.fused(model, ctx):
        fused[layers[node]] += 1
    result = FusionCount(census.op, sum(expected_by_layer.values()), sum(fused.values()))
    short = {layer: n for layer, n in expected_by_layer.items() if fused.get(layer, 0) < n}
    if not short:
        return result
    best_by_layer: dict[str, tuple[int, str]] = {}
    misses = rule_misses(model, census.rules(model, ctx)) if census.rules is not None else {}
    for node, (score, reason) in misses.items():
        layer = layers.get(node)
        if layer in short and score > best_by_layer.get(layer, (0, ""))[0]:
            best_by_layer[layer] = (score, reason)
    tried: dict[str, int] = defaultdict(int)
    for node in misses:
        tried[layers.get(node, "")] += 1
    for layer in sorted(short, key=lambda key: (key == OUTSIDE_LAYERS, int(key) if key.isdigit() else 0)):
        score, reason = best_by_layer.get(layer, (0, ""))
        if census.rules is None:
            reason = "the pass found nothing to rewrite"
        elif score <= 1:  # every candidate failed at its first node: no one of them stands out as the site
            reason = f"no subgraph matched a pattern beyond its output node ({tried[layer]} candidates there)"
        result.misses.append(Miss(layer, short[layer], fused.get(layer, 0), reason))
    return result
