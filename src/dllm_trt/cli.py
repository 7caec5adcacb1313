"""dllm-trt command line: one verb per stage, each reading and writing a directory with a manifest.

This module only turns arguments into each stage's options and prints the results. Defaults live in
the options dataclasses: an argument not given is left out, so the dataclass default applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from dllm_trt.errors import DllmError


def _options(cls: type, args: argparse.Namespace, **values: object) -> object:
    """`cls` from the arguments given (argparse leaves the others out) plus converted `values`."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(given | values))


def _default(cls: type, name: str) -> str:
    """A field's default, for --help (the dataclass holds it once)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "none" if field.default is None else str(field.default)


def _parse_ids(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise DllmError(f"--prompt-ids takes comma-separated integers like 5,17,42, not '{text}'") from None
    if not ids:
        raise DllmError("--prompt-ids is empty; pass comma-separated token ids like 5,17,42")
    return ids


def _parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DllmError(f"--seeds takes comma-separated integers like 0,1, not '{text}'") from None
    if not seeds:
        raise DllmError("--seeds is empty; pass comma-separated integers like 0,1")
    return seeds


def _print_canvas(canvas) -> None:  # noqa: ANN001 (runtime.CanvasText)
    for row, tokens in enumerate(canvas.rows):
        head = f"[canvas {canvas.event.index} · row {row} · {canvas.event.steps[row]} steps]"
        shown = repr(canvas.text[row]) if canvas.text is not None else " ".join(map(str, tokens))
        print(f"{head} {shown}", flush=True)


def _print_generation(result) -> None:  # noqa: ANN001 (runtime.GenerateResult)
    if result.text is not None:
        for row, (prompt, text) in enumerate(zip(result.prompt_text, result.text)):
            print(f"\n--- row {row} ---\n{prompt}{text}")
    stats = result.stats
    print(
        f"\n{stats['new_tokens']} tokens in {stats['seconds']:.2f} s = {stats['tokens_per_second']} tok/s "
        f"({result.backend}, {result.execution}); denoise steps per canvas {stats['denoise_steps_per_canvas']} "
        f"(mean {stats['mean_denoise_steps_per_canvas']}); tokens per forward {stats['tokens_per_forward']}; "
        f"step latency median {stats['step_ms_median']} ms, p90 {stats['step_ms_p90']} ms",
        file=sys.stderr,
    )


def _print_validation(result) -> int:  # noqa: ANN001 (validate.ValidateResult)
    print(result.markdown)
    if not result.passed:
        print(f"dllm-trt: validation failed: {'; '.join(result.failures)}", file=sys.stderr)
        return 1
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from dllm_trt.manifest import atomic_output
    from dllm_trt.models.presets import PRESETS, has_tower, make_checkpoint

    if args.preset not in PRESETS:
        raise DllmError(f"unknown preset '{args.preset}'; choose one of: {', '.join(PRESETS)}")
    if args.layers is not None and args.layers < 1:
        raise DllmError("--layers must be a positive integer")
    with atomic_output(args.out, force=args.force) as tmp:
        model = make_checkpoint(tmp, args.preset, args.seed, num_layers=args.layers)
    params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    tower = sum(p.numel() for n, p in model.named_parameters() if "vision" in n) if has_tower(args.preset) else 0
    vision = f" and {tower / 1e6:.2f}M in its vision tower" if tower else ""
    described = f"{params / 1e6:.2f}M text parameters{vision}, seed {args.seed}"
    print(f"wrote {args.preset} checkpoint ({described}) to {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from dllm_trt import export

    values = {}
    if hasattr(args, "max_soft_tokens"):
        values["max_soft_tokens"] = _parse_ints("--max-soft-tokens", args.max_soft_tokens)
    result = export.run(_options(export.ExportOptions, args, **values))
    files = ", ".join(g["file"] for g in result.manifest["graphs"].values())
    print(f"wrote {result.output}: {files} and manifest.json")
    if result.parity_failed:
        print(f"dllm-trt: parity check failed ({result.parity_failed}); graphs kept in {result.output} for "
              "inspection", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dllm_trt.export.inspect import inspect_artifacts, print_inspection

    result = inspect_artifacts(args.artifacts)
    print_inspection(result)
    return 0 if result.ok else 1


def _generate(args: argparse.Namespace) -> int:
    from dllm_trt import runtime

    options = _options(
        runtime.GenerateOptions, args, prompts=tuple(getattr(args, "prompt", ())),
        prompt_ids=tuple(_parse_ids(text) for text in getattr(args, "prompt_ids", ())),
        images=tuple(getattr(args, "image", ())),
    )  # fmt: skip
    json_out = getattr(args, "json", False)
    result = runtime.run(options, on_canvas=None if json_out else _print_canvas)
    if json_out:
        print(result.to_json())
    else:
        _print_generation(result)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dllm_trt import validate

    values: dict = dict(prompt_ids=tuple(_parse_ids(text) for text in getattr(args, "prompt_ids", ())))
    if hasattr(args, "seeds"):
        values["seeds"] = _parse_seeds(args.seeds)
    return _print_validation(validate.run(_options(validate.ValidateOptions, args, **values)))


def _optimize(args: argparse.Namespace) -> int:
    from dllm_trt import optimize

    result = optimize.run(_options(optimize.OptimizeOptions, args))
    print(f"wrote {result.output}: step.onnx, manifest.json, fusion_report.md")
    for line in result.unfused:
        print(f"dllm-trt: left unfused: {line}", file=sys.stderr)
    if result.failed_passes:
        print(f"dllm-trt: parity failed after {', '.join(result.failed_passes)}; see {result.output}/fusion_report.md",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _build(args: argparse.Namespace) -> int:
    from dllm_trt.engines import stage

    result = stage.run(_options(stage.BuildOptions, args, profiles=tuple(getattr(args, "profile", ()))))
    if result.info is None:
        print(stage.format_plan(result.plan))
        return 0
    engines = ", ".join(e["file"] for e in result.info["engines"].values())
    print(f"wrote {args.output}/{engines}, build_info.json and manifest.json "
          f"(TensorRT {result.info['tensorrt_version']})")  # fmt: skip
    return 0


def _lint_trt(args: argparse.Namespace) -> int:
    from dllm_trt.engines import lint

    report = lint.run(_options(lint.LintOptions, args, profiles=tuple(getattr(args, "profile", ()))))
    print(report.table())
    return 0 if report.passed else 1


def _parse_ints(flag: str, text: str) -> tuple[int, ...]:
    """`--contexts 4K,32K,256K` -> (4096, 32768, 262144)."""
    try:
        values = tuple(int(p[:-1]) * 1024 if p.lower().endswith("k") else int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise DllmError(
            f"{flag} takes comma-separated integers (a K suffix means x1024) like 4K,32K, not '{text}'"
        ) from None
    if not values:
        raise DllmError(f"{flag} is empty; pass comma-separated integers")
    return values


def _plan(args: argparse.Namespace) -> int:
    from dllm_trt.engines import memory_plan

    values: dict = {}
    for flag, name in (("--batches", "batches"), ("--contexts", "contexts")):
        if hasattr(args, name):
            values[name] = _parse_ints(flag, getattr(args, name))
    if hasattr(args, "precisions"):
        values["precisions"] = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    if hasattr(args, "gpu"):
        values["gpus"] = tuple(args.gpu)
    plan = memory_plan.run(_options(memory_plan.PlanOptions, args, **values))
    print(plan.table())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dllm_trt import demo

    result = demo.run(_options(demo.DemoOptions, args), on_canvas=_print_canvas)
    _print_generation(result.generation)
    code = _print_validation(result.validation)
    if code == 0:
        print(f"demo artifacts in {result.out}: onnx/ (exported graphs, manifest.json), optimized/ (fused graphs, "
              "fusion_report.md), report/ (report.md, report.json)")  # fmt: skip
    return code


def _default_prompt_chunk() -> int:
    from dllm_trt.generation.prompt_chunks import DEFAULT_PROMPT_CHUNK

    return DEFAULT_PROMPT_CHUNK


# ---- serving: `serve` and `triton-repo` -------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from dllm_trt import serve
    from dllm_trt.generation.scheduler import SchedulerOptions

    serve.run(_options(serve.ServeOptions, args, scheduler=_options(SchedulerOptions, args)))
    return 0


def _triton_repo(args: argparse.Namespace) -> int:
    from dllm_trt.serve import triton_repo

    result = triton_repo.run(_options(triton_repo.TritonRepoOptions, args))
    print(f"wrote {result.output}: model '{result.model_name}' (step in-process: {result.backend}), "
          f"{len(result.files)} files; see {result.output}/README.md to deploy it")  # fmt: skip
    return 0


def _add_serving_verbs(verb) -> None:  # noqa: ANN001 (build_parser's verb())
    from dllm_trt.generation.backends import BACKENDS
    from dllm_trt.generation.scheduler import SchedulerOptions
    from dllm_trt.serve.stage import ServeOptions

    def limits(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--max-batch", type=int, help=f"requests batched into one step call (default "
                         f"{_default(SchedulerOptions, 'max_batch')})")  # fmt: skip
        sub.add_argument("--max-queue", type=int, help=f"requests waiting beyond those; more get HTTP 429 (default "
                         f"{_default(SchedulerOptions, 'max_queue')})")  # fmt: skip
        sub.add_argument("--max-context", type=int, help=f"prompt + new tokens of one request, the slots of its "
                         f"cache (default {_default(SchedulerOptions, 'max_context')})")  # fmt: skip

    sub = verb("serve", "an OpenAI-compatible HTTP server over exported, optimized or built artifacts", _serve)
    sub.add_argument("artifacts", type=Path, help="directory written by export, optimize or build")
    sub.add_argument("--backend", help=f"{' | '.join(BACKENDS)} (default {_default(ServeOptions, 'backend')})")
    sub.add_argument("--device", help=f"cpu | cuda (default {_default(ServeOptions, 'device')})")
    sub.add_argument("--checkpoint", type=Path, help="for --backend torch (default: the exported one)")
    sub.add_argument("--host", help=f"address to bind (default {_default(ServeOptions, 'host')}: this machine only)")
    sub.add_argument("--port", type=int, help=f"default {_default(ServeOptions, 'port')}")
    sub.add_argument("--model-name", help="the name clients ask for (default: the checkpoint directory's name)")
    sub.add_argument("--chat-template", type=Path, help="a Jinja chat template, for tokenizers without one")
    sub.add_argument("--threads", type=int, help="onnxruntime's intra-op threads (default 0: one per core)")
    limits(sub)

    sub = verb("triton-repo", "write a Triton Inference Server model repository for artifacts", _triton_repo)
    sub.add_argument("artifacts", type=Path, help="directory written by export, optimize or build (with a tokenizer)")
    sub.add_argument("-o", "--output", type=Path, required=True, help="the model repository to write")
    sub.add_argument("--model-name", help="the Triton model's name (default: the checkpoint directory's name)")
    sub.add_argument("--instances", type=int, help="model instances per server (default 1)")
    limits(sub)
    sub.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def build_parser() -> argparse.ArgumentParser:
    from dllm_trt import demo, export, optimize, runtime, validate
    from dllm_trt.contract import DEFAULT_MAX_SOFT_TOKENS, PRECISIONS, TARGETS
    from dllm_trt.engines import memory_plan
    from dllm_trt.engines.lint import LintOptions
    from dllm_trt.engines.stage import BuildOptions
    from dllm_trt.generation.backends import BACKENDS
    from dllm_trt.models.presets import PRESETS as MODEL_PRESETS
    from dllm_trt.trt.gpu_presets import PRESETS as GPU_PRESETS
    from dllm_trt.trt.support import VERSIONS

    parser = argparse.ArgumentParser(prog="dllm-trt", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, run) -> argparse.ArgumentParser:  # noqa: A002, ANN001
        sub = verbs.add_parser(name, help=help, description=help, argument_default=argparse.SUPPRESS)
        sub.set_defaults(run=run)
        return sub

    force = dict(action="store_true", help="replace a non-empty output directory")

    Demo = demo.DemoOptions  # noqa: N806
    sub = verb("demo", "the main job on the embedded checkpoint: export, optimize, generate, validate", _demo)
    sub.add_argument("--out", type=Path, help=f"output directory (default {_default(Demo, 'out')})")
    sub.add_argument("--prompt", help=f"prompt text (default {_default(Demo, 'prompt')!r})")
    sub.add_argument("--max-new-tokens", type=int, help="default: the generation config's")
    sub.add_argument("--seed", type=int, help=f"default {_default(Demo, 'seed')}")
    sub.add_argument("--force", **force)

    sub = verb("make-tiny", "write a small random DiffusionGemma checkpoint (real architecture)", _make_tiny)
    sub.add_argument("out", type=Path, help="output checkpoint directory")
    sub.add_argument("--preset", default="tiny", help=f"{' | '.join(MODEL_PRESETS)} (default: tiny)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    sub.add_argument("--force", default=False, **force)

    Export = export.ExportOptions  # noqa: N806
    sub = verb(
        "export", "export the step (encoder pass and denoise step, one graph) to ONNX, with measured parity", _export
    )
    sub.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory (safetensors)")
    sub.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    sub.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity measurement")
    sub.add_argument("--seed", type=int, help=f"seed of the parity check's inputs (default {_default(Export, 'seed')})")
    sub.add_argument("--dtype", help="float32 | float16 | bfloat16 (default: the checkpoint's); float32 for CPU parity")
    sub.add_argument("--max-soft-tokens", help="comma-separated soft tokens per image, one vision graph each, of 70, "
                     f"140, 280, 560, 1120 (default {DEFAULT_MAX_SOFT_TOKENS})")  # fmt: skip
    sub.add_argument("--no-vision", dest="vision", action="store_false", help="leave the checkpoint's vision tower "
                     "out (text only); by default it is exported where the checkpoint holds one")  # fmt: skip
    sub.add_argument("--force", **force)

    sub = verb("inspect", "verify an artifact directory's checksums and summarize its graphs", _inspect)
    sub.add_argument("artifacts", type=Path, help="a directory written by export or optimize")

    Optimize = optimize.OptimizeOptions  # noqa: N806
    sub = verb("optimize", "fuse the exported graphs for a target; every pass proven", _optimize)
    sub.add_argument("artifacts", type=Path, help="directory written by export")
    sub.add_argument(
        "--target",
        required=True,
        help=f"{' | '.join(TARGETS)} (ort-cuda: never run on a GPU; runs here through CPU stand-ins)",
    )
    sub.add_argument(
        "--precision",
        help=f"{' | '.join(PRECISIONS)} (default {_default(Optimize, 'precision')}); fp8 and nvfp4 (--target trt): "
        "bf16 graphs with the MoE experts in fp8 (a scale per output channel) or nvfp4 (e2m1, an fp8 scale per 16 "
        "values, an fp32 scale per expert) and the attention / dense-MLP projections in fp8, weight-only: "
        "computed from the weights alone, so no calibration data is needed",
    )
    sub.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    sub.add_argument("--parity", help=f"each | final | none: when to measure parity (default "
                     f"{_default(Optimize, 'parity')})")  # fmt: skip
    sub.add_argument("--reference", type=Path, help="the checkpoint, if it moved since export")
    sub.add_argument(
        "--seed", type=int, help=f"seed of the parity check's inputs (default {_default(Optimize, 'seed')})"
    )
    sub.add_argument(
        "--allow-unfused", action="store_true",
        help="write graphs whose attention or MoE layers a rule left unfused (trt, ort-cuda refuse them otherwise: "
        "an unfused MoE runs every token through every expert); the report lists every miss either way",
    )  # fmt: skip
    sub.add_argument("--force", **force)

    Generate = runtime.GenerateOptions  # noqa: N806
    sub = verb("generate", "run the block-diffusion loop over exported, optimized or built artifacts", _generate)
    sub.add_argument("artifacts", type=Path, help="directory written by export, optimize or build")
    sub.add_argument("--prompt-ids", action="append", metavar="IDS", help="comma-separated ids; repeat for a batch")
    sub.add_argument("--prompt", action="append", metavar="TEXT", help="text (needs a tokenizer); repeat for a batch")
    sub.add_argument("--max-new-tokens", type=int, help="default: the generation config's")
    sub.add_argument("--max-denoising-steps", type=int, help="default: the generation config's")
    sub.add_argument("--seed", type=int, help=f"default {_default(Generate, 'seed')}")
    sub.add_argument("--backend", help=f"{' | '.join(BACKENDS)} (default {_default(Generate, 'backend')})")
    sub.add_argument("--device", help=f"cpu | cuda (default {_default(Generate, 'device')})")
    sub.add_argument("--checkpoint", type=Path, help="for --backend torch (default: the exported one)")
    sub.add_argument("--image", type=Path, action="append", metavar="PATH", help="an image; repeat for several, in "
                     "the order of their places: the image token in --prompt, the checkpoint's image_token_id once in "
                     "--prompt-ids")  # fmt: skip
    soft = _default(Generate, "max_soft_tokens")
    sub.add_argument("--max-soft-tokens", type=int, help="soft tokens per image at most: 70 | 140 | 280 | 560 | "
                     f"1120 (default {soft}; the export needs a vision graph for it)")  # fmt: skip
    sub.add_argument("--json", action="store_true", help="print one JSON object: sequences and stats")
    sub.add_argument("--prompt-chunk", type=int, help="tokens per encoder pass over a long prompt, each over the "
                     "cache of the previous ones (default: the engine's new_tokens maximum, else "
                     f"{_default_prompt_chunk()})")  # fmt: skip

    Validate = validate.ValidateOptions  # noqa: N806
    sub = verb("validate", "parity of artifacts against transformers; writes a report", _validate)
    sub.add_argument("artifacts", type=Path, help="directory written by export or optimize")
    sub.add_argument("--reference", type=Path, required=True, help="the checkpoint the artifacts came from")
    sub.add_argument("--report", dest="report_dir", type=Path, help="directory for report.json and report.md")
    sub.add_argument("--backend", help=f"backend under test (default {_default(Validate, 'backend')})")
    sub.add_argument("--seeds", help="comma-separated seeds (default 0,1)")
    sub.add_argument("--prompt-ids", action="append", metavar="IDS", help="comma-separated ids; repeat for a batch")
    sub.add_argument("--max-new-tokens", type=int, help="default: enough to pass the sliding window")
    sub.add_argument(
        "--per-layer", action="store_true",
        help="every layer against transformers' same layer, one layer resident at a time (released-size "
        "checkpoints); names the first divergent layer and block; report.md gets a per-layer plot",
    )  # fmt: skip
    sub.add_argument(
        "--canvas", type=int, help="--per-layer: canvas tokens of the denoise calls (default: the model's)"
    )
    sub.add_argument(
        "--no-layer-check", dest="layer_check", action="store_false",
        help="skip the per-layer check a reduced-precision (bf16, fp16, fp8, nvfp4) graph gets beside the "
        "whole-generation judging (it catches one layer's error that whole generations hide)",
    )  # fmt: skip
    sub.add_argument(
        "--no-golden", dest="golden", action="store_false",
        help="with --report DIR: skip DIR/golden/ (the calls' inputs and transformers' outputs for stock "
        "'polygraphy run', on the graph here and on the engine on its GPU; canvas --canvas or at most 32)",
    )  # fmt: skip

    sub = verb("build", "build the TensorRT engine from 'optimize --target trt' output", _build)
    sub.add_argument("optimized", type=Path, help="directory written by 'dllm-trt optimize --target trt'")
    sub.add_argument("-o", "--output", type=Path, required=True, help="output directory for the engines")
    sub.add_argument("--gpu", required=True, help=" | ".join(GPU_PRESETS))
    sub.add_argument(
        "--profile",
        action="append",
        metavar="DIM=MIN:OPT:MAX",
        help="override one profile dimension (batch, new_tokens, cache_full, cache_sliding); repeat",
    )
    sub.add_argument("--timing-cache", type=Path, help="default: ~/.cache/dllm-trt/timing-caches/")
    sub.add_argument(
        "--opt-level", type=int, help=f"builder optimization level 0..5 (default {_default(BuildOptions, 'opt_level')})"
    )
    sub.add_argument("--ptx-version", type=int, help="cap the plugins' PTX ISA (e.g. 88)")
    sub.add_argument("--dry-run", action="store_true", help="check and print the plan; needs no TensorRT or GPU")
    sub.add_argument("--profile-per-phase", action="store_true", help="one optimization profile per phase (prompt, "
                     "canvas) instead of one for both: tactics tuned to prompts, for more engine bytes")  # fmt: skip
    sub.add_argument(
        "--golden", type=Path,
        help="the golden/ folder 'dllm-trt validate OPTIMIZED --report DIR' wrote (DIR/golden): copied beside the "
        "engine, for 'polygraphy run step.engine --trt' on its GPU",
    )  # fmt: skip
    sub.add_argument("--force", **force)

    sub = verb("plan", "weights, KV cache and activations of an engine per GPU, before exporting anything", _plan)
    sub.add_argument("source", help="a checkpoint or artifact directory, or a preset: released | "
                     + " | ".join(MODEL_PRESETS))  # fmt: skip
    sub.add_argument("--gpu", action="append", help="a GPU preset to judge; repeat (default: every preset)")
    sub.add_argument("--precisions", help="comma-separated, of bf16, fp8, nvfp4 (default: all three)")
    sub.add_argument("--batches", help="comma-separated batch sizes (default 1,8)")
    sub.add_argument("--contexts", help="comma-separated context lengths, K = 1024 (default 4K,32K,256K)")
    sub.add_argument("--prompt-chunk", type=int, help="tokens per prompt pass, the engine's new_tokens maximum "
                     f"(default {_default(memory_plan.PlanOptions, 'prompt_chunk')})")  # fmt: skip

    sub = verb(
        "lint-trt", "judge optimized graphs with TensorRT's own parser and builder (a table without them)", _lint_trt
    )
    sub.add_argument("optimized", type=Path, help="directory written by 'dllm-trt optimize --target trt'")
    sub.add_argument("--trt-version", help=f"{' | '.join(VERSIONS)} (default {VERSIONS[-1]})")
    sub.add_argument("--gpu", help=f"GPU preset whose default profiles are checked (default "
                     f"{_default(LintOptions, 'gpu')})")  # fmt: skip
    sub.add_argument("--profile", action="append", metavar="DIM=MIN:OPT:MAX", help="profile override, as for build")
    sub.add_argument(
        "--table-only",
        action="store_true",
        help="the pre-flight support table alone, even where a TensorRT library is installed",
    )
    _add_serving_verbs(verb)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines say what is happening
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DllmError as exc:
        print(f"dllm-trt: error: {exc}", file=sys.stderr)
        return exc.exit_code
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
