"""Parity per precision on the trained checkpoint: `dllm-trt validate` of bf16, fp8 and nvfp4 graphs.

The embedded checkpoint (src/dllm_trt/assets/pycode-tiny) is exported, optimized for TensorRT per
precision and validated through the CPU stand-in of the MoE plugin (the quantized arithmetic:
dequantize, then fp32; bf16 emulated in fp32). Then a copy of the nvfp4 graphs whose scales for one
expert are off by 2x (`--corrupt`: the down projection's global scale of expert 0, in one layer or
in every layer) is validated the same way: a judge worth having fails it.

    python bench/bench_quantized_parity.py [--workdir DIR] [--precisions bf16,fp8,nvfp4]

Each validate's own printout goes to DIR/logs; the summary (verdict, failures, the report's
figures) is printed. No GPU; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import onnx_ir as ir

from dllm_trt.contract import GRAPH_FILES, MOE_INPUTS, MOE_OP
from dllm_trt.manifest import read_manifest, save_graphs, write_manifest

CHECKPOINT = Path(__file__).resolve().parents[1] / "src" / "dllm_trt" / "assets" / "pycode-tiny"


def cli(*argv: object, log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "dllm_trt.cli", *map(str, argv)], stdout=out, stderr=out
        ).returncode
    return code, time.perf_counter() - start


def corrupt_expert_scale(source: Path, out: Path, layers: str, expert: int = 0, factor: float = 2.0) -> list[str]:
    """A copy of an nvfp4 (or fp8) artifact with one expert's down-projection scales times `factor`, in
    the first DllmMoE layer (`layers="one"`) or all of them; the manifest re-describes the graph."""
    shutil.copytree(source, out)
    model = ir.load(str(source / GRAPH_FILES["step"]))  # read beside the source: save_graphs replaces the copy
    changed = []
    for node in model.graph:
        if node.op_type != MOE_OP:
            continue
        fmt = node.attributes["weight_format"].value
        name = {"fp8": "down_scale", "nvfp4": "down_global_scale"}[fmt]
        value = node.inputs[MOE_INPUTS[fmt].index(name)]
        array = value.const_value.numpy().copy()
        array[expert] *= factor
        value.const_value = ir.tensor(array, name=value.name)
        changed.append(value.name)
        if layers == "one":
            break
    manifest = read_manifest(out)
    manifest["graphs"] = save_graphs({"step": model}, out, GRAPH_FILES)
    manifest["corrupted"] = dict(scales=changed, expert=expert, factor=factor)
    write_manifest(out, manifest)
    return changed


def figures(report: dict) -> dict:
    """What a validate report says per judged quantity (the envelope verdicts), and end to end."""
    generation = report.get("generation", {})
    return dict(
        envelope_verdicts=generation.get("envelope_verdicts"),
        decisions=generation.get("decisions"),
        end_to_end=generation.get("end_to_end"),
        calls=dict(replayed=generation.get("calls_replayed"), judged=generation.get("calls_judged")),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-quant-parity"))
    parser.add_argument("--precisions", default="bf16,fp8,nvfp4")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    code, seconds = cli("export", CHECKPOINT, "-o", work / "onnx", "--no-parity", log=work / "logs" / "export.log")
    if code:
        print("export failed: see the log")
        return 1
    print(f"export: {seconds:.1f} s")
    candidates = {}
    for precision in args.precisions.split(","):
        out = work / f"trt-{precision}"
        code, seconds = cli("optimize", work / "onnx", "--target", "trt", "--precision", precision, "-o", out,
                            "--parity", "none", log=work / "logs" / f"optimize-{precision}.log")  # fmt: skip
        if code:
            print(f"optimize {precision} failed: see the log")
            return 1
        print(f"optimize {precision}: {seconds:.1f} s")
        candidates[precision] = out
    if "nvfp4" in candidates:
        for layers in ("one", "all"):
            out = work / f"trt-nvfp4-expert0-x2-{layers}"
            changed = corrupt_expert_scale(candidates["nvfp4"], out, layers)
            print(f"corrupted copy ({layers}): {', '.join(changed)} x2")
            candidates[f"nvfp4 expert 0 scale x2 ({layers} layer{'s' if layers == 'all' else ''})"] = out
    rows = []
    for name, path in candidates.items():
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        report_dir = work / "reports" / slug
        code, seconds = cli("validate", path, "--reference", CHECKPOINT, "--report", report_dir,
                            log=work / "logs" / f"validate-{slug}.log")  # fmt: skip
        report = json.loads((report_dir / "report.json").read_text()) if (report_dir / "report.json").is_file() else {}
        rows.append((name, code, seconds, report))
        print(f"validate {name}: exit {code} in {seconds:.0f} s; failures: {report.get('failures')}")
    print("\n| artifact | validate exit | s | failures |\n|---|---|---|---|")
    for name, code, seconds, report in rows:
        print(f"| {name} | {code} ({'pass' if code == 0 else 'FAIL'}) | {seconds:.0f} | {report.get('failures')} |")
    (work / "summary.json").write_text(json.dumps(
        {name: dict(exit=code, seconds=seconds, failures=report.get("failures"), figures=figures(report))
         for name, code, seconds, report in rows}, indent=2, default=float))  # fmt: skip
    print(f"\nfigures per artifact: {work / 'summary.json'}; logs: {work / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
