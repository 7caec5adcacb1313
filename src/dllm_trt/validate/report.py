"""report.json for machines, report.md for a person who has ten seconds."""

from __future__ import annotations

import json
from pathlib import Path

from dllm_trt.parity.compare import ENVELOPE_MULTIPLE, TOLERANCES, group_name
from dllm_trt.parity.generation_parity import GENERATION_TOLERANCES, NEAR_TIE_ULPS, GenerationParity
from dllm_trt.parity.step_parity import ParityResult


def report_dict(
    artifacts: Path, backend: str, execution: str, step: ParityResult, generation: GenerationParity
) -> dict:
    worst = generation.worst()
    return dict(
        artifacts=str(artifacts),
        backend=backend,
        execution=execution,
        passed=step.passed and generation.passed,
        failures=step.failures() + generation.failures(),
        tolerances=dict(
            step={k: vars(v) for k, v in TOLERANCES.items()},
            generation={
                k: dict(
                    step=vars(v.step),
                    entropy_abs=v.entropy_abs,
                    decision_agreement=v.decision_agreement,
                    token_agreement=v.token_agreement,
                )
                for k, v in GENERATION_TOLERANCES.items()
            },
        ),
        random_input_parity=step.to_dict(),
        generation=dict(
            dtype=generation.dtype,
            seeds=generation.seeds,
            prompt_lengths=generation.prompt_lengths,
            max_new_tokens=generation.max_new_tokens,
            calls_replayed=len(generation.steps),
            calls_judged=generation.judged,
            envelope=generation.envelope,
            calls_with_router_tie=generation.router_ties,
            near_tie_margin=generation.near_tie_margin,
            worst_per_quantity={k: c.to_dict() for k, c in worst.items()},
            decisions=[a.to_dict() for a in generation.decisions],
            envelope_verdicts=[v.to_dict() for v in generation.verdicts()],
            end_to_end=generation.end_to_end,
            per_call=[
                dict(
                    kind=r.kind,
                    canvas=r.canvas,
                    step=r.step,
                    router_tie=r.router_tie,
                    router_margin=r.router_margin,
                    comparisons=[c.to_dict() for c in r.comparisons],
                )
                for r in generation.steps
            ],
        ),
    )


def markdown(report: dict) -> str:
    generation = report["generation"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"# dllm-trt validate: {verdict}",
        "",
        f"`{report['artifacts']}` on **{report['backend']}** ({report['execution']}) vs transformers, "
        f"dtype {generation['dtype']}, "
        f"seeds {generation['seeds']}, prompts of {generation['prompt_lengths']} tokens, "
        f"{generation['max_new_tokens']} new tokens, {generation['calls_replayed']} calls replayed, "
        f"{generation['calls_judged']} judged.",
        "",
    ]
    if generation["envelope"]:
        lines += [
            f"Reduced precision is judged against the envelope: how far transformers itself, run in "
            f"{generation['dtype']} on the same inputs, is from its fp32 self. A quantity passes when the median over "
            f"its judged entries of each entry's typical (median per-token) relative error is within "
            f"{ENVELOPE_MULTIPLE:g} x the envelope's (decisions: "
            f"mean disagreement within {ENVELOPE_MULTIPLE:g} x the envelope's plus one position). Per-entry rows "
            "below are informative.",
            "",
            "| quantity | entries | ours: median (worst) | envelope: median (worst) | bound | ok |",
            "|---|---|---|---|---|---|",
        ]
        verdicts = [("random inputs (informative)", v) for v in report["random_input_parity"]["envelope_verdicts"]]
        verdicts += [("generation", v) for v in generation["envelope_verdicts"]]
        for where, v in verdicts:
            lines.append(
                f"| {where}: {v['quantity']} | {v['entries']} | {v['value']:.3e} ({v['worst']:.3e}) | "
                f"{v['envelope']:.3e} ({v['envelope_worst']:.3e}) | {v['bound']:.3e} | "
                f"{'yes' if v['passed'] else ('beyond' if 'informative' in where else '**NO**')} |"
            )
        lines.append("")
    if generation["calls_with_router_tie"]:
        lines += [
            f"{generation['calls_with_router_tie']} replayed call(s) had a tie at the reference router's top-k "
            f"boundary (relative margin <= {generation['near_tie_margin']:.1e}, {NEAR_TIE_ULPS} fp32 ulps): which "
            "expert wins there is decided by rounding (or, on an exact tie, by torch.topk's unspecified order against "
            "ONNX TopK's lower index), so those calls are reported in report.json, not judged.",
            "",
        ]
    if report["failures"]:
        lines += ["**Failed:**", ""] + [f"- {f}" for f in report["failures"]] + [""]
    lines += ["| check | worst max abs | worst max rel | tolerance | argmax | ok |", "|---|---|---|---|---|---|"]
    groups: dict[str, dict] = {}
    for comparison in report["random_input_parity"]["comparisons"]:  # worst per quantity, not per layer
        name = group_name(comparison["name"])
        best = groups.get(name)
        if best is None or (not comparison["passed"], comparison["max_rel"]) > (not best["passed"], best["max_rel"]):
            groups[name] = comparison
    for name, comparison in groups.items():
        lines.append(_row(f"random inputs: {name}", comparison, generation["envelope"]))
    for name, comparison in generation["worst_per_quantity"].items():
        lines.append(_row(f"generation: {name}", comparison, generation["envelope"]))
    for decision in generation["decisions"]:
        ok = "yes" if decision["passed"] else "**NO**"
        lines.append(
            f"| generation: {decision['name']} agreement (worst step) | | {100 * decision['value']:.2f}% | "
            f">= {100 * decision['required']:.2f}% | | {ok} |"
        )
    lines += [
        "",
        "| seed | token agreement | denoise calls per canvas (reference / ours) | tokens per forward | ok |",
        "|---|---|---|---|---|",
    ]
    for run in generation["end_to_end"]:
        agreement = f"{100 * run['token_agreement']:.2f}%"
        lines.append(
            f"| {run['seed']} | {agreement} | {run['reference_calls_per_canvas']} / "
            f"{run['candidate_calls_per_canvas']} | {run['candidate_tokens_per_forward']} | "
            f"{'yes' if run['passed'] else '**NO**'} |"
        )
    lines += [
        "",
        "Relative error is max|a-b| / max|b| over the compared tensor. onnxruntime on CPU computes fp16/bf16 by "
        "emulation and is a weak judge of reduced-precision parity.",
        "",
    ]
    return "\n".join(lines)


def _row(name: str, comparison: dict, informative: bool = False) -> str:
    argmax = "" if comparison["argmax_agreement"] is None else f"{100 * comparison['argmax_agreement']:.2f}%"
    ok = "yes" if comparison["passed"] else ("beyond (informative)" if informative else "**NO**")
    return (
        f"| {name} | {comparison['max_abs']:.3e} | {comparison['max_rel']:.3e} | "
        f"{comparison['tolerance']['max_rel']:.1e} | {argmax} | {ok} |"
    )


def write_report(directory: Path, report: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(markdown(report))
