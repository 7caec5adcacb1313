"""`dllm-trt demo`: the main job on the embedded default, end to end, on this CPU.

Checkpoint (the shipped trained one, else a fresh `tiny`) -> export (with parity) -> optimize for
onnxruntime on CPU (fused graphs, parity after the passes) -> generate over the optimized graphs
(streaming canvases) -> validate them against transformers (report). Every stage writes its own
directory under OUT, as the individual verbs do.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dllm_trt.errors import DllmError

SHIPPED = Path(__file__).parent / "assets" / "pycode-tiny"
DEFAULT_PROMPT = "def fibonacci(n):"


def shipped_checkpoint() -> Path | None:
    return SHIPPED if (SHIPPED / "model.safetensors").is_file() else None


def run_demo(args: argparse.Namespace) -> int:
    from dllm_trt.export import export_checkpoint
    from dllm_trt.models.presets import make_checkpoint
    from dllm_trt.optimize import optimize_artifacts
    from dllm_trt.runtime.generate_command import run_generate
    from dllm_trt.validate.run import validate_artifacts

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.force:
        raise DllmError(f"demo output {out} exists and is not empty; remove it, pick another --out, or pass --force")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    checkpoint = shipped_checkpoint()
    if checkpoint is None:
        checkpoint = out / "checkpoint"
        print(f"== no shipped checkpoint; making a random 'tiny' one in {checkpoint}", file=sys.stderr)
        make_checkpoint(checkpoint, "tiny", seed=0)
    else:
        print(f"== checkpoint: {checkpoint} (trained here, see examples/train_pycode.py)", file=sys.stderr)

    print(f"== export -> {out / 'onnx'}", file=sys.stderr)
    manifest = export_checkpoint(checkpoint, out / "onnx")
    if "parity_failed" in manifest:
        raise DllmError(f"export parity failed ({manifest['parity_failed']}); see {out / 'onnx' / 'manifest.json'}")

    print(f"== optimize for ort-cpu -> {out / 'optimized'}", file=sys.stderr)
    optimized = optimize_artifacts(out / "onnx", out / "optimized", "ort-cpu", "fp32", parity="final")
    failed = [p["name"] for p in optimized["passes"] if p["parity"] and p["parity"].get("passed") is False]
    if failed:
        raise DllmError(f"parity failed after {', '.join(failed)}; see {out / 'optimized' / 'fusion_report.md'}")

    print("== generate (onnxruntime, CPU, optimized graphs)", file=sys.stderr)
    has_tokenizer = (out / "optimized" / "tokenizer.json").is_file()
    generate_args = argparse.Namespace(
        artifacts=out / "optimized", prompt=[args.prompt] if has_tokenizer else None,
        prompt_ids=None if has_tokenizer else ["5,17,42"], max_new_tokens=args.max_new_tokens,
        max_denoising_steps=None, seed=args.seed, backend="onnxruntime", device="cpu", checkpoint=None, json=False,
    )  # fmt: skip
    run_generate(generate_args)

    print(f"== validate the optimized graphs against transformers -> {out / 'report'}", file=sys.stderr)
    report = validate_artifacts(out / "optimized", checkpoint, seeds=(args.seed,), report_dir=out / "report")
    print(report["markdown"])
    if not report["passed"]:
        print(f"dllm-trt: validation failed: {'; '.join(report['failures'])}", file=sys.stderr)
        return 1
    print(
        f"demo artifacts in {out}: onnx/ (exported graphs, manifest.json), optimized/ (fused graphs, "
        "fusion_report.md), report/ (report.md, report.json)"
    )
    return 0
