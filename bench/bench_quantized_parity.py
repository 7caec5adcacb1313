"""Parity per precision on the trained checkpoint: `dllm-trt validate` of bf16, fp8 and nvfp4 graphs.

The embedded checkpoint (src/dllm_trt/assets/pycode-tiny) is exported, optimized for TensorRT per
precision and validated through the CPU stand-in of the MoE plugin (the quantized arithmetic:
dequantize, then fp32; bf16 emulated in fp32). Then copies of the nvfp4 graphs whose scales for one
expert are off by 2x (the down projection's global scale of the expert the router picks most, in
the first layer or in every layer; the trained checkpoint's router leaves some experts unused, so
a fixed expert id can be a dead one) are validated the same way: a judge worth having fails them.

Two judges, both `dllm-trt validate` against the fp32 reference with the envelope of the reference
quantized the same way (transformers in bf16 holding exactly the dequantized weights the artifact
stores, kernels.quantization): `validate` (whole generations replayed call by call) and
`per-layer` (`validate --per-layer`: every layer against transformers' same layer).

    python bench/bench_quantized_parity.py [--workdir DIR] [--precisions bf16,fp8,nvfp4] [--reuse]

Each validate's printout goes to DIR/logs (CLI runs); the summary (verdict, failures, the
envelope figures) is printed and written to DIR/summary.json. No GPU; about 20 minutes on 2 cores.
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


def busiest_experts(checkpoint: Path, seed: int = 0) -> list[int]:
    """Per layer, the expert the reference's router picks most often for 128 random tokens."""
    import torch

    from dllm_trt.models.checkpoint import load_model

    model = load_model(checkpoint, dtype=torch.float32)
    picks: dict[str, list[int]] = {}
    routers = [(n, m) for n, m in model.named_modules() if n.endswith("router") and ".layers." in n]

    def recorder(name: str):  # noqa: ANN202
        def record(_module, _inputs, out) -> None:  # noqa: ANN001 (a hook returning a value would replace the output)
            picks.setdefault(name, out[2].flatten().tolist())

        return record

    for name, router in routers:
        router.register_forward_hook(recorder(name))
    ids = torch.randint(3, model.config.text_config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.model.encoder.language_model(input_ids=ids)
    # the decoder's routers are the encoder's modules' twins (tied weights): the encoder pass names each layer once
    return [max(set(picks[name]), key=picks[name].count) for name, _ in routers if name in picks]


def corrupt_expert_scale(source: Path, out: Path, experts: list[int], factor: float = 2.0) -> list[str]:
    """A copy of an nvfp4 (or fp8) artifact with the down-projection scales of expert `experts[i]` of
    DllmMoE layer i times `factor` (as many layers as `experts` names); the manifest re-describes the graph."""
    shutil.copytree(source, out)
    model = ir.load(str(source / GRAPH_FILES["step"]))  # read beside the source: save_graphs replaces the copy
    changed = []
    layers = [node for node in model.graph if node.op_type == MOE_OP]
    for node, expert in zip(layers, experts):
        fmt = node.attributes["weight_format"].value
        name = {"fp8": "down_scale", "nvfp4": "down_global_scale"}[fmt]
        value = node.inputs[MOE_INPUTS[fmt].index(name)]
        array = value.const_value.numpy().copy()
        array[expert] *= factor
        value.const_value = ir.tensor(array, name=value.name)
        changed.append(f"{value.name}[{expert}]")
    manifest = read_manifest(out)
    manifest["graphs"] = save_graphs({"step": model}, out, GRAPH_FILES)
    manifest["corrupted"] = dict(scales=changed, expert=expert, factor=factor)
    write_manifest(out, manifest)
    return changed


def figures(report: dict) -> dict:
    """What a validate report says per judged quantity (the envelope verdicts), and end to end."""
    if "per_layer" in report:
        layers = report["per_layer"]
        return dict(first_divergent_layer=layers["first_divergent_layer"], block=layers["first_divergent_block"],
                    layers=[dict(layer=x["layer"], passed=x["passed"], expert_agreement=x["expert_agreement"])
                            for x in layers["layers"]])  # fmt: skip
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
    parser.add_argument("--reuse", action="store_true", help="keep the workdir's export and optimized graphs")
    parser.add_argument("--judges", default="validate,per-layer")
    args = parser.parse_args()
    work = args.workdir
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    if not (work / "onnx").is_dir():
        code, seconds = cli("export", CHECKPOINT, "-o", work / "onnx", "--no-parity", log=work / "logs" / "export.log")
        if code:
            print("export failed: see the log")
            return 1
        print(f"export: {seconds:.1f} s")
    candidates = {}
    for precision in args.precisions.split(","):
        out = work / f"trt-{precision}"
        if not out.is_dir():
            code, seconds = cli("optimize", work / "onnx", "--target", "trt", "--precision", precision, "-o", out,
                                "--parity", "none", log=work / "logs" / f"optimize-{precision}.log")  # fmt: skip
            if code:
                print(f"optimize {precision} failed: see the log")
                return 1
            print(f"optimize {precision}: {seconds:.1f} s")
        candidates[precision] = (out, precision)
    if "nvfp4" in candidates:
        busiest = busiest_experts(CHECKPOINT)
        print(f"the router's busiest expert per layer: {busiest}")
        for layers, experts in (("one", busiest[:1]), ("all", busiest)):
            out = work / f"trt-nvfp4-busiest-x2-{layers}"
            shutil.rmtree(out, ignore_errors=True)
            changed = corrupt_expert_scale(candidates["nvfp4"][0], out, experts)
            print(f"corrupted copy ({layers}): {', '.join(changed)} x2")
            label = "first layer" if layers == "one" else "every layer"
            candidates[f"nvfp4, busiest expert's scale x2 ({label})"] = (out, "nvfp4")
    rows = []
    for judge in args.judges.split(","):
        for name, (path, _) in candidates.items():
            slug = (
                f"{judge}-{name}".replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("'", "")
            )
            report_dir = work / "reports" / slug
            mode = ["--per-layer"] if judge == "per-layer" else []
            code, seconds = cli("validate", path, "--reference", CHECKPOINT, *mode, "--report", report_dir,
                                log=work / "logs" / f"{slug}.log")  # fmt: skip
            report = (
                json.loads((report_dir / "report.json").read_text()) if (report_dir / "report.json").is_file() else {}
            )
            rows.append((judge, name, code, seconds, report))
            print(f"{judge}: {name}: exit {code} in {seconds:.0f} s; failures: {report.get('failures')}", flush=True)
    print("\n| judge | artifact | verdict | s | failures |\n|---|---|---|---|---|")
    for judge, name, code, seconds, report in rows:
        verdict = "pass" if code == 0 else "FAIL"
        print(f"| {judge} | {name} | {verdict} | {seconds:.0f} | {len(report.get('failures') or [])} |")
    (work / "summary.json").write_text(json.dumps(
        {f"{judge}: {name}": dict(exit=code, seconds=seconds, failures=report.get("failures"), figures=figures(report))
         for judge, name, code, seconds, report in rows}, indent=2, default=float))  # fmt: skip
    print(f"\nfigures per artifact: {work / 'summary.json'}; logs: {work / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
