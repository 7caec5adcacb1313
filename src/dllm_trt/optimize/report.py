"""fusion_report.json and fusion_report.md: per pass, what matched, what changed, and parity after it."""

from __future__ import annotations

import json
from pathlib import Path

from dllm_trt.contract import GRAPH_FILES, OUTSIDE_LAYERS


def write_fusion_report(stem: Path, manifest: dict, entries: list[dict]) -> None:
    """`stem`.json and `stem`.md."""
    report = dict(target=manifest["target"], precision=manifest["precision"], passes=entries)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(manifest, entries))


def markdown(manifest: dict, entries: list[dict]) -> str:
    lines = [
        f"# dllm-trt optimize: target {manifest['target']}, precision {manifest['precision']}",
        "",
        "| pass | graph | matched | ops removed | ops added | parity after the pass |",
        "|---|---|---|---|---|---|",
    ]
    for entry in entries:
        parity = _parity_cell(entry.get("parity"))
        for graph, result in entry["graphs"].items():
            removed = ", ".join(f"{op} {n}" for op, n in result["changed"].items() if n < 0) or "-"
            added = ", ".join(f"{op} +{n}" for op, n in result["changed"].items() if n > 0) or "-"
            lines.append(f"| {entry['name']} | {graph} | {result['matched']} | {removed} | {added} | {parity} |")
    lines += ["", "## Fusions against the model", "",
              "How many of each op the model runs (export's census of its modules), how many were fused, and for "
              "each layer a rule missed, the rule's own reason.", "",
              "| op | the model has | fused | missed |", "|---|---|---|---|"]  # fmt: skip
    for entry in entries:
        for result in entry["graphs"].values():
            fusion = result.get("fusion")
            if fusion is None:
                continue
            missed = "<br>".join(
                f"{'outside the layers' if m['layer'] == OUTSIDE_LAYERS else 'layer ' + m['layer']}: "
                f"{m['fused']} of {m['expected']}: {m['reason']}"
                for m in fusion["misses"]
            )  # fmt: skip
            lines.append(f"| {fusion['op']} | {fusion['expected']} | {fusion['fused']} | {missed or '-'} |")
    lines += ["", "Final op counts:", ""]
    for graph in GRAPH_FILES:
        for entry in reversed(entries):
            if graph in entry["graphs"]:
                counts = entry["graphs"][graph]["ops_after"]
                lines.append(f"- {graph}: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
                break
    lines.append("")
    return "\n".join(lines)


def _parity_cell(parity: dict | None) -> str:
    if parity is None:
        return "not measured (--parity final/none)"
    if not parity["measured"]:
        return f"not measurable on CPU: {parity['reason']}"
    comparisons = parity["result"]["comparisons"]
    worst = max(comparisons, key=lambda c: c["max_rel"])
    if parity["passed"]:
        verdict = "ok" if parity["judged"] else "within the informative bound"
    else:
        verdict = ("**FAILED** " if parity["judged"] else "drift beyond the informative bound: ") + ", ".join(
            parity["failed"]
        )
    execution = f" (onnxruntime CPU: {parity['execution']})" if parity.get("execution", "native") != "native" else ""
    return f"{verdict} (worst {worst['name']}: max rel {worst['max_rel']:.2e}){execution}"
