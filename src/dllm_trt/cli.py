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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-trt", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

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
    return parser


def main(argv: list[str] | None = None) -> int:
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
