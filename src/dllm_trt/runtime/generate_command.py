"""`dllm-trt generate`: prompts in, canvases streamed as they are committed, stats at the end."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.manifest import read_manifest
from dllm_trt.runtime.backends import open_step
from dllm_trt.runtime.loop import CanvasEvent, GenerationSettings, generate, left_pad


def load_tokenizer(artifacts: Path):  # noqa: ANN201
    """The tokenizer carried beside the graphs, or None when the checkpoint had none."""
    if not (artifacts / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(artifacts))
    except (OSError, ValueError):
        return PreTrainedTokenizerFast(tokenizer_file=str(artifacts / "tokenizer.json"))


def generation_config(artifacts: Path) -> dict:
    path = artifacts / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def prompts_from_args(args: argparse.Namespace, tokenizer) -> list[list[int]]:  # noqa: ANN001
    from dllm_trt.cli import _parse_ids

    if args.prompt and args.prompt_ids:
        raise DllmError("pass either --prompt or --prompt-ids, not both")
    if args.prompt:
        if tokenizer is None:
            raise DllmError(f"{args.artifacts} has no tokenizer.json, so --prompt cannot be encoded; use --prompt-ids")
        return [tokenizer(text)["input_ids"] for text in args.prompt]
    if args.prompt_ids:
        return [_parse_ids(text) for text in args.prompt_ids]
    raise DllmError("no prompt: pass --prompt-ids 5,17,42 (or --prompt TEXT when the checkpoint has a tokenizer)")


def run_generate(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.artifacts)
    tokenizer = load_tokenizer(args.artifacts)
    prompts = prompts_from_args(args, tokenizer)
    vocab = manifest["model"]["vocab_size"]
    bad = [i for p in prompts for i in p if not 0 <= i < vocab]
    if bad:
        raise DllmError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise DllmError("--max-new-tokens must be a positive integer")
    settings = GenerationSettings.from_generation_config(
        generation_config(args.artifacts), max_new_tokens=args.max_new_tokens,
        max_denoising_steps=args.max_denoising_steps,
    )  # fmt: skip
    step = open_step(args.artifacts, args.backend, args.device, args.checkpoint)
    pad = manifest["model"]["pad_token_id"] or 0
    input_ids, mask = left_pad(prompts, pad)
    printed = [""] * len(prompts)

    def stream(event: CanvasEvent) -> None:
        if args.json:
            return
        for row, tokens in enumerate(event.tokens.tolist()):
            kept = [t for t in tokens if t != pad]
            head = f"[canvas {event.index} · row {row} · {event.steps[row]} steps]"
            if tokenizer is not None:
                text = tokenizer.decode(kept, skip_special_tokens=True)
                printed[row] += text
                print(f"{head} {text!r}", flush=True)
            else:
                print(f"{head} {' '.join(map(str, kept))}", flush=True)

    result = generate(step, settings, input_ids, mask, seed=args.seed, on_canvas=stream)
    stats = result.stats()
    if args.json:
        out = dict(sequences=result.sequences.tolist(), backend=args.backend, seed=args.seed, **stats)
        if tokenizer is not None:
            out["text"] = [tokenizer.decode(s[input_ids.shape[1] :], skip_special_tokens=True)
                           for s in result.sequences.tolist()]  # fmt: skip
        print(json.dumps(out))
        return 0
    if tokenizer is not None:
        for row, prompt in enumerate(prompts):
            print(f"\n--- row {row} ---\n{tokenizer.decode(prompt, skip_special_tokens=True)}{printed[row]}")
    print(
        f"\n{stats['new_tokens']} tokens in {stats['seconds']:.2f} s = {stats['tokens_per_second']} tok/s "
        f"({args.backend}); denoise steps per canvas {stats['denoise_steps_per_canvas']} "
        f"(mean {stats['mean_denoise_steps_per_canvas']}); tokens per forward {stats['tokens_per_forward']}; "
        f"step latency median {stats['step_ms_median']} ms, p90 {stats['step_ms_p90']} ms",
        file=sys.stderr,
    )
    return 0
