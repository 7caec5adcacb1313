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
        args.checkpoint, args.output, parity=not args.no_parity, seed=args.seed, force=args.force, dtype=args.dtype
    )
    print(f"wrote {args.output}/encoder.onnx, denoiser.onnx and manifest.json")
    if "parity_failed" in manifest:
        print(
            f"dllm-trt: parity check failed ({manifest['parity_failed']}); graphs kept in {args.output} for inspection",
            file=sys.stderr,
        )
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dllm_trt.export.inspect import inspect_artifacts, print_inspection

    result = inspect_artifacts(args.artifacts)
    print_inspection(result)
    return 0 if result.ok else 1


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


def _build(args: argparse.Namespace) -> int:
    from dllm_trt.engines.stage import BuildOptions, build_engines, format_plan, plan_build

    given = dict(
        precision=args.precision, profiles=tuple(args.profile or ()), timing_cache=args.timing_cache,
        opt_level=args.opt_level, moe=args.moe, ptx_version=args.ptx_version, force=args.force,
    )  # fmt: skip
    # an option not given is left to BuildOptions, the one place defaults live
    options = BuildOptions(gpu=args.gpu, **{k: v for k, v in given.items() if v is not None})
    if args.dry_run:
        print(format_plan(plan_build(args.optimized, options)))
        return 0
    info = build_engines(args.optimized, args.output, options)
    engines = ", ".join(e["file"] for e in info["engines"].values())
    print(f"wrote {args.output}/{engines}, build_info.json and manifest.json (TensorRT {info['tensorrt_version']})")
    return 0


def _lint_trt(args: argparse.Namespace) -> int:
    from dllm_trt.engines.lint import lint_artifacts

    given = dict(gpu=args.gpu, profile_overrides=args.profile)
    report = lint_artifacts(args.optimized, args.trt_version, **{k: v for k, v in given.items() if v is not None})
    print(report.table())
    return 0 if report.passed else 1


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
    export.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: the checkpoint's); float32 for CPU parity"
    )
    export.set_defaults(run=_export)

    inspect = verbs.add_parser("inspect", help="verify an artifact directory's checksums and summarize its graphs")
    inspect.add_argument("artifacts", type=Path, help="directory written by export (or optimize)")
    inspect.set_defaults(run=_inspect)

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

    build = verbs.add_parser("build", help="build TensorRT engines from 'optimize --target trt' output")
    build.add_argument("optimized", type=Path, help="directory written by 'dllm-trt optimize --target trt'")
    build.add_argument("-o", "--output", type=Path, required=True, help="output directory for the engines")
    build.add_argument("--gpu", required=True, help="h100 | h200 | dgx-spark | b200 | gb300 (must be this machine's)")
    build.add_argument("--precision", default=None, help="bf16 | fp8 | nvfp4 (default: the GPU preset's)")
    build.add_argument("--profile", action="append", metavar="DIM=MIN:OPT:MAX",
                       help="override one profile dimension (batch, new_tokens, cache_full, cache_sliding); repeat")
    build.add_argument("--timing-cache", type=Path, default=None, help="default: ~/.cache/dllm-trt/timing-caches/")
    build.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0..5 (default 3)")
    build.add_argument("--moe", default=None, help="chain (4 single-kernel plugins, default) | single")
    build.add_argument("--ptx-version", type=int, default=None, help="cap the plugins' PTX ISA (e.g. 88)")
    build.add_argument("--dry-run", action="store_true", help="check and print the plan; needs no TensorRT or GPU")
    build.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    build.set_defaults(run=_build)

    lint = verbs.add_parser("lint-trt", help="check optimized graphs against TensorRT's ONNX parser, without TensorRT")
    lint.add_argument("optimized", type=Path, help="directory written by 'dllm-trt optimize --target trt'")
    lint.add_argument("--trt-version", default=None, help="10.14 | 10.15 | 11.x (default 11.x)")
    lint.add_argument("--gpu", default=None, help="GPU preset whose default profiles are checked (default h100)")
    lint.add_argument("--profile", action="append", metavar="DIM=MIN:OPT:MAX", help="profile override, as for build")
    lint.set_defaults(run=_lint_trt)
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
