"""dllm-trt command line: one verb per stage, each reading and writing a directory with a manifest."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dllm_trt.errors import DllmError


def _make_tiny(args: argparse.Namespace) -> int:
    from dllm_trt.manifest import atomic_output
    from dllm_trt.models.presets import PRESETS, make_checkpoint

    if args.preset not in PRESETS:
        raise DllmError(f"unknown preset '{args.preset}'; choose one of: {', '.join(PRESETS)}")
    with atomic_output(args.out, force=args.force) as tmp:
        model = make_checkpoint(tmp, args.preset, args.seed, num_layers=args.layers)
    params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    print(f"wrote {args.preset} checkpoint ({params / 1e6:.2f}M text parameters, seed {args.seed}) to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dllm_trt.export import export_checkpoint

    manifest = export_checkpoint(
        args.checkpoint, args.output, parity=not args.no_parity, seed=args.seed, force=args.force
    )
    print(f"wrote {args.output}/encoder.onnx, denoiser.onnx and manifest.json")
    if "parity_failed" in manifest:
        print(
            f"dllm-trt: parity check failed ({manifest['parity_failed']}); graphs kept in {args.output} for inspection",
            file=sys.stderr,
        )
        return 1
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise DllmError(f"--prompt-ids takes comma-separated integers like 5,17,42, not '{text}'") from None
    if not ids:
        raise DllmError("--prompt-ids is empty; pass comma-separated token ids like 5,17,42")
    return ids


def _generate(args: argparse.Namespace) -> int:
    from dllm_trt.runtime.generate_command import run_generate

    return run_generate(args)


def _validate(args: argparse.Namespace) -> int:
    from dllm_trt.validate.run import validate_artifacts

    prompts = [_parse_ids(p) for p in args.prompt_ids] if args.prompt_ids else None
    seeds = tuple(int(s) for s in args.seeds.split(","))
    report = validate_artifacts(
        args.artifacts, args.reference, args.backend, seeds, prompts, args.max_new_tokens, args.report
    )
    print(report["markdown"])
    if not report["passed"]:
        print(f"dllm-trt: validation failed: {'; '.join(report['failures'])}", file=sys.stderr)
        return 1
    return 0


def _optimize(args: argparse.Namespace) -> int:
    from dllm_trt.optimize import optimize_artifacts

    manifest = optimize_artifacts(
        args.artifacts, args.output, args.target, args.precision, args.parity, args.seed, args.force,
        reference_checkpoint=args.reference,
    )  # fmt: skip
    print(f"wrote {args.output}: encoder.onnx, denoiser.onnx, manifest.json, fusion_report.md")
    failed = [
        p["name"] for p in manifest["passes"]
        if p["parity"] and p["parity"].get("judged") and p["parity"].get("passed") is False
    ]  # fmt: skip
    if failed:
        print(f"dllm-trt: parity failed after {', '.join(failed)}; see {args.output}/fusion_report.md", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dllm_trt.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-trt", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", help="the main job on the embedded checkpoint: export, generate, validate")
    demo.add_argument(
        "--out", type=Path, default=Path("dllm-trt-demo"), help="output directory (default ./dllm-trt-demo)"
    )
    demo.add_argument("--prompt", default="def fibonacci(n):", help="prompt text (when the checkpoint has a tokenizer)")
    demo.add_argument("--max-new-tokens", type=int, default=None, help="default: the generation config's")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    demo.set_defaults(run=_demo)

    tiny = verbs.add_parser("make-tiny", help="write a small random DiffusionGemma checkpoint (real architecture)")
    tiny.add_argument("out", type=Path, help="output checkpoint directory")
    tiny.add_argument("--preset", default="tiny", help="tiny | small | full-width (default: tiny)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    tiny.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    tiny.set_defaults(run=_make_tiny)

    export = verbs.add_parser("export", help="export the encoder and denoise steps to ONNX, with measured parity")
    export.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory (safetensors)")
    export.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    export.add_argument("--no-parity", action="store_true", help="skip the parity measurement")
    export.add_argument("--seed", type=int, default=0, help="seed of the parity check's random inputs")
    export.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    export.set_defaults(run=_export)

    opt = verbs.add_parser("optimize", help="fuse the exported graphs for a target; every pass proven")
    opt.add_argument("artifacts", type=Path, help="directory written by export")
    opt.add_argument("--target", required=True, help="trt | ort-cuda | ort-cpu")
    opt.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (default fp32)")
    opt.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    opt.add_argument("--parity", default="each", help="each | final | none: when to measure parity (default each)")
    opt.add_argument("--reference", type=Path, default=None, help="the checkpoint, if it moved since export")
    opt.add_argument("--seed", type=int, default=0, help="seed of the parity check's random inputs")
    opt.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    opt.set_defaults(run=_optimize)

    gen = verbs.add_parser("generate", help="run the block-diffusion loop over exported graphs")
    gen.add_argument("artifacts", type=Path, help="directory written by export")
    gen.add_argument("--prompt-ids", action="append", metavar="IDS", help="comma-separated ids; repeat for a batch")
    gen.add_argument("--prompt", action="append", metavar="TEXT", help="text (needs a tokenizer); repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="default: the generation config's")
    gen.add_argument("--max-denoising-steps", type=int, default=None, help="default: the generation config's")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--backend", default="onnxruntime", help="torch | onnxruntime | tensorrt (default onnxruntime)")
    gen.add_argument("--device", default="cpu", help="cpu | cuda")
    gen.add_argument("--checkpoint", type=Path, default=None, help="for --backend torch (default: the exported one)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: sequences and stats")
    gen.set_defaults(run=_generate)

    val = verbs.add_parser("validate", help="parity of artifacts against transformers; writes a report")
    val.add_argument("artifacts", type=Path, help="directory written by export")
    val.add_argument("--reference", type=Path, required=True, help="the checkpoint the artifacts came from")
    val.add_argument("--report", type=Path, default=None, help="directory for report.json and report.md")
    val.add_argument("--backend", default="onnxruntime", help="backend under test (default onnxruntime)")
    val.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    val.add_argument("--prompt-ids", action="append", metavar="IDS", help="comma-separated ids; repeat for a batch")
    val.add_argument("--max-new-tokens", type=int, default=None, help="default: enough to pass the sliding window")
    val.set_defaults(run=_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DllmError as exc:
        print(f"dllm-trt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dllm-trt: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless asked for the traceback
        if os.environ.get("DLLM_TRT_DEBUG"):
            raise
        print(
            f"dllm-trt: internal error: {type(exc).__name__}: {exc} (set DLLM_TRT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
