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
    argmax_agreement: float  # fraction of positions whose argmax must agree (logits only)


# fp32 graphs must match to fp32 accuracy. Reduced precision is measured and reported: its bound
# catches a broken graph (NaN, a wrong cast, a lost scale), while argmax and token agreement are
# reported but not judged, since a random or undertrained model's near-tied logits flip under any
# rounding. onnxruntime on CPU emulates fp16 partly and bf16 not at all: a weak judge there.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(max_rel=1e-4, argmax_agreement=1.0),
    "float16": Tolerance(max_rel=2e-2, argmax_agreement=0.0),
    "bfloat16": Tolerance(max_rel=5e-2, argmax_agreement=0.0),
}


def tolerance_for(dtype: torch.dtype | str) -> Tolerance:
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES[name]


@dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    argmax_agreement: float | None
    passed: bool
    tolerance: Tolerance
    finite: bool = True

    def line(self) -> str:
        argmax = "" if self.argmax_agreement is None else f"  argmax agree {100 * self.argmax_agreement:6.2f}%"
        verdict = "ok  " if self.passed else "FAIL"
        return (
            f"{verdict} {self.name:<34} max abs {self.max_abs:.3e}  max rel {self.max_rel:.3e} "
            f"(tol {self.tolerance.max_rel:.0e}){argmax}"
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
) -> Comparison:
    """Compare where `valid` (broadcastable boolean) is True; argmax agreement over the last axis."""
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
    agreement = None
    if argmax:
        agree = actual.argmax(-1) == reference.argmax(-1)
        if valid is not None:
            agree = agree[valid.expand_as(actual)[..., 0]]
        agreement = float(agree.double().mean()) if agree.numel() else 1.0
    passed = finite and max_rel <= tolerance.max_rel
    if agreement is not None:
        passed = passed and agreement >= tolerance.argmax_agreement
    return Comparison(name, max_abs, max_rel, agreement, passed, tolerance, finite)


def agreement(name: str, actual: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance) -> Comparison:
    """Share of equal entries of two integer tensors (token ids), judged by the argmax tolerance."""
    share = float((actual == reference).double().mean()) if reference.numel() else 1.0
    differ = float((actual != reference).double().sum())  # reported as max_abs: how many entries differ
    return Comparison(name, differ, 0.0, share, share >= tolerance.argmax_agreement, tolerance)


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
