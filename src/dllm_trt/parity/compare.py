"""Compare two tensors the way every parity report in dllm-trt does, with tolerances per dtype.

Relative error is the infinity-norm relative error, max|a - b| / max|b|: per-element ratios make
near-zero entries dominate and say nothing about the graph (the fp32 reference itself is 1.5e-4
"off" its own fp64 run by a 1%-floored per-element ratio, but 1.5e-6 by this measure).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    max_rel: float
    argmax_agreement: float  # fraction of positions whose argmax must agree (logits, token ids)
    slack_positions: int = 0  # disagreeing positions allowed beyond argmax_agreement
    envelope: float | None = None  # the measured envelope this bound derives from, when it does


# fp32 graphs must match to fp32 accuracy. Reduced precision is judged against an envelope measured
# on the reference itself (judge_by_envelope); where none was measured, these bounds only inform:
# they catch a broken graph (NaN, a wrong cast, a lost scale), nothing finer.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_rel=1e-4, argmax_agreement=1.0),
    "float16": Tolerance(max_rel=2e-2, argmax_agreement=0.0),
    "bfloat16": Tolerance(max_rel=5e-2, argmax_agreement=0.0),
}
# A reduced-precision artifact may be this many times as far from the fp32 reference as transformers
# itself is when run in the artifact's dtype on the same inputs (the envelope).
ENVELOPE_MULTIPLE = 2.0


def tolerance_for(dtype: torch.dtype | str) -> Tolerance:
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES[name]


@dataclass
class EnvelopeVerdict:
    """One quantity of a reduced-precision artifact judged against the envelope, over all its entries.

    Typical errors, not maxima: on an MoE model a router whose top-k margin is within the dtype's
    rounding may pick another expert in any reduced-precision implementation (transformers' own
    included), for tokens that differ between implementations; that moves a few tokens a lot and the
    typical token little, while a broken graph (a lost scale, a wrong norm) moves every token. Value
    quantities: the median over entries of each entry's median per-token error (Comparison.median_rel)
    <= ENVELOPE_MULTIPLE x the envelope's (never tighter than fp32's bound). Decisions (argmax, ids):
    mean disagreement <= ENVELOPE_MULTIPLE x the envelope's, plus one position of the smallest entry.
    """

    quantity: str
    entries: int
    value: float  # median relative error, or mean disagreement share
    worst: float
    envelope: float
    envelope_worst: float
    bound: float
    decision: bool
    finite: bool = True

    @property
    def passed(self) -> bool:
        return self.finite and self.entries > 0 and self.value <= self.bound

    def line(self) -> str:
        what = "disagreement" if self.decision else "median rel"
        return (
            f"{'ok  ' if self.passed else 'FAIL'} {self.quantity:<28} {what} {self.value:.3e} "
            f"(worst {self.worst:.3e}) <= {self.bound:.3e}: envelope {self.envelope:.3e} "
            f"(worst {self.envelope_worst:.3e}), {self.entries} entries"
        )

    def to_dict(self) -> dict:
        return asdict(self) | dict(passed=self.passed)


def judge_by_envelope(pairs: list[tuple[str, Comparison, Comparison]]) -> list[EnvelopeVerdict]:
    """(quantity, candidate's comparison, envelope's comparison on the same entry) -> a verdict per quantity."""
    groups: dict[str, list[tuple[Comparison, Comparison]]] = {}
    for quantity, candidate, envelope in pairs:
        groups.setdefault(quantity, []).append((candidate, envelope))
    verdicts = []
    for quantity, members in groups.items():
        finite = all(c.finite for c, _ in members)
        if all(c.positions and c.max_rel == 0.0 for c, _ in members):  # decisions: shares of equal ids
            cand = [1.0 - c.argmax_agreement for c, _ in members]
            env = [1.0 - e.argmax_agreement for _, e in members]
            slack = max(1.0 / c.positions for c, _ in members)  # one position of the smallest entry
            value, envelope = sum(cand) / len(cand), sum(env) / len(env)
            bound = ENVELOPE_MULTIPLE * envelope + slack
            verdicts.append(EnvelopeVerdict(quantity, len(members), value, max(cand), envelope, max(env), bound, True,
                                            finite))  # fmt: skip
            continue
        cand = sorted(c.median_rel for c, _ in members)
        env = sorted(e.median_rel for _, e in members)
        value, envelope = cand[(len(cand) - 1) // 2], env[(len(env) - 1) // 2]  # lower medians
        worst, envelope_worst = max(c.max_rel for c, _ in members), max(e.max_rel for _, e in members)
        bound = max(ENVELOPE_MULTIPLE * envelope, TOLERANCES["float32"].max_rel)
        verdicts.append(
            EnvelopeVerdict(quantity, len(members), value, worst, envelope, envelope_worst, bound, False, finite)
        )
    return verdicts


@dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    argmax_agreement: float | None
    passed: bool
    tolerance: Tolerance
    finite: bool = True
    positions: int = 0  # entries an agreement share is over (0 for value comparisons)
    median_rel: float = 0.0  # the typical token's error: median over tokens of max|a-b| over features, / max|b|

    def line(self) -> str:
        argmax = "" if self.argmax_agreement is None else f"  argmax agree {100 * self.argmax_agreement:6.2f}%"
        verdict = "ok  " if self.passed else "FAIL"
        envelope = "" if self.tolerance.envelope is None else f", envelope {self.tolerance.envelope:.1e}"
        return (
            f"{verdict} {self.name:<34} max abs {self.max_abs:.3e}  max rel {self.max_rel:.3e} "
            f"(tol {self.tolerance.max_rel:.1e}{envelope}){argmax}"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tolerance"] = asdict(self.tolerance)
        return out


def compare(
    name: str,
    actual: torch.Tensor,
    reference: torch.Tensor,
    tolerance: Tolerance,
    valid: torch.Tensor | None = None,
    argmax: bool = False,
    features: int = 1,
) -> Comparison:
    """Compare where `valid` (broadcastable boolean) is True; argmax agreement over the last axis.

    A token is everything but the last `features` axes (0: every element is one), for median_rel."""
    actual = actual.detach().to(torch.float64)
    reference = reference.detach().to(torch.float64)
    if actual.shape != reference.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} vs reference {tuple(reference.shape)}")
    finite = bool(torch.isfinite(actual).all())
    if valid is not None:
        mask = valid.expand_as(actual)
        actual_v, reference_v = actual[mask], reference[mask]
    else:
        actual_v, reference_v = actual.flatten(), reference.flatten()
    diff = (actual_v - reference_v).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(reference_v.abs().max()) if reference_v.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    per_token = (actual - reference).abs()
    mask = valid.expand_as(actual) if valid is not None else torch.ones_like(actual, dtype=torch.bool)
    per_token = per_token.masked_fill(~mask, float("nan"))
    if features:
        per_token = per_token.flatten(-features).amax(-1)  # nan where the token is invalid
    per_token = per_token[~per_token.isnan()]
    typical = float(per_token.median()) if per_token.numel() else 0.0
    median_rel = typical / scale if scale > 0 else (0.0 if typical == 0 else float("inf"))
    agreement = None
    if argmax:
        agree = actual.argmax(-1) == reference.argmax(-1)
        if valid is not None:
            agree = agree[valid.expand_as(actual)[..., 0]]
        agreement = float(agree.double().mean()) if agree.numel() else 1.0
        positions = agree.numel()
    passed = finite and max_rel <= tolerance.max_rel
    if agreement is not None:
        passed = passed and agrees(agreement, positions, tolerance)
        return Comparison(name, max_abs, max_rel, agreement, passed, tolerance, finite, positions, median_rel)
    return Comparison(name, max_abs, max_rel, agreement, passed, tolerance, finite, median_rel=median_rel)


def agrees(share: float, positions: int, tolerance: Tolerance) -> bool:
    """Whether an agreement share over `positions` meets the tolerance (its slack positions included)."""
    return share >= tolerance.argmax_agreement - tolerance.slack_positions / max(positions, 1) - 1e-12


def agreement(name: str, actual: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance) -> Comparison:
    """Share of equal entries of two integer tensors (token ids), judged by the argmax tolerance."""
    share = float((actual == reference).double().mean()) if reference.numel() else 1.0
    differ = float((actual != reference).double().sum())  # reported as max_abs: how many entries differ
    passed = agrees(share, reference.numel(), tolerance)
    return Comparison(name, differ, 0.0, share, passed, tolerance, positions=reference.numel())


def group_name(name: str) -> str:
    """'encoder prompt key.3' -> 'encoder prompt key/value': one row per quantity, not per layer."""
    stem = re.sub(r"\.\d+$", "", name)
    return re.sub(r"\b(key|value)$", "key/value", stem)


def worst_per_group(comparisons: list[Comparison]) -> list[tuple[str, int, Comparison]]:
    """(group, how many compared, the failing or worst comparison) in first-seen order."""
    groups: dict[str, list[Comparison]] = {}
    for comparison in comparisons:
        groups.setdefault(group_name(comparison.name), []).append(comparison)
    out = []
    for name, members in groups.items():
        worst = max(members, key=lambda c: (not c.passed, c.max_rel, -(c.argmax_agreement or 1.0)))
        out.append((name, len(members), worst))
    return out


def summary_lines(comparisons: list[Comparison]) -> list[str]:
    """One line per quantity: its worst (or failing) comparison, and how many tensors it covers."""
    lines = []
    for name, count, worst in worst_per_group(comparisons):
        line = worst.line().replace(worst.name.ljust(34), (name + (f" ({count})" if count > 1 else "")).ljust(34))
        lines.append(line)
    return lines
