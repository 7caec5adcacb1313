"""`dllm-trt demo`: the main job on the embedded default, end to end, on this CPU.

Checkpoint (the shipped trained one, else a fresh `tiny`) -> export (with parity) -> optimize for
onnxruntime on CPU (fused graphs, parity after the passes) -> generate over the optimized graphs
(streaming canvases) -> validate them against transformers (report). Every stage writes its own
directory under `out`, as the individual verbs do, through the same `run(options)` functions.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dllm_trt import export, optimize, runtime, validate
from dllm_trt.errors import DllmError
from dllm_trt.models.presets import make_checkpoint

SHIPPED = Path(__file__).parent / "assets" / "pycode-tiny"


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("dllm-trt-demo")
    prompt: str = "def fibonacci(n):"  # used when the checkpoint has a tokenizer
    max_new_tokens: int | None = None  # None: the generation config's
    seed: int = 0
    force: bool = False  # replace a non-empty output directory


@dataclass(frozen=True)
class DemoResult:
    out: Path
    generation: runtime.GenerateResult
    validation: validate.ValidateResult


def shipped_checkpoint() -> Path | None:
    return SHIPPED if (SHIPPED / "model.safetensors").is_file() else None


def run(options: DemoOptions, on_canvas: Callable[[runtime.CanvasText], None] | None = None) -> DemoResult:
    out = options.out
    if out.exists() and not out.is_dir():
        raise DllmError(f"demo output {out} is a file; pick another --out")
    if out.exists() and any(out.iterdir()) and not options.force:
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
    # text only: the shipped checkpoint was trained on text; its tower is transformers' untrained placeholder
    exported = export.run(export.ExportOptions(checkpoint, out / "onnx", vision=False))
    if exported.parity_failed:
        raise DllmError(f"export parity failed ({exported.parity_failed}); see {out / 'onnx' / 'manifest.json'}")

    print(f"== optimize for ort-cpu -> {out / 'optimized'}", file=sys.stderr)
    optimized = optimize.run(optimize.OptimizeOptions(out / "onnx", out / "optimized", "ort-cpu", parity="final"))
    if optimized.failed_passes:
        raise DllmError(f"parity failed after {', '.join(optimized.failed_passes)}; see "
                        f"{out / 'optimized' / 'fusion_report.md'}")  # fmt: skip

    print("== generate (onnxruntime, CPU, optimized graphs)", file=sys.stderr)
    has_tokenizer = (out / "optimized" / "tokenizer.json").is_file()
    prompt = dict(prompts=(options.prompt,)) if has_tokenizer else dict(prompt_ids=((5, 17, 42),))
    generation = runtime.run(
        runtime.GenerateOptions(out / "optimized", max_new_tokens=options.max_new_tokens, seed=options.seed, **prompt),
        on_canvas=on_canvas,
    )

    print(f"== validate the optimized graphs against transformers -> {out / 'report'}", file=sys.stderr)
    validation = validate.run(
        validate.ValidateOptions(out / "optimized", checkpoint, seeds=(options.seed,), report_dir=out / "report")
    )
    return DemoResult(out, generation, validation)
