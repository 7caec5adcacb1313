"""`dllm-trt generate`: `run(GenerateOptions) -> GenerateResult`; prompts in, canvases handed to a
callback as they are committed, sequences, text and stats out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.generation.backends import BACKENDS, open_step
from dllm_trt.generation.loop import CanvasEvent, GenerationSettings, generate, left_pad
from dllm_trt.generation.tokenizer import generation_config, load_tokenizer
from dllm_trt.manifest import read_manifest


@dataclass(frozen=True)
class GenerateOptions:
    artifacts: Path
    prompts: tuple[str, ...] = ()  # text, encoded with the tokenizer carried beside the graphs
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # or token ids; one prompt per batch row
    max_new_tokens: int | None = None  # None: the generation config's
    max_denoising_steps: int | None = None  # None: the generation config's
    seed: int = 0
    backend: str = "onnxruntime"  # one of generation.backends.BACKENDS
    device: str = "cpu"  # cpu | cuda
    checkpoint: Path | None = None  # for the torch backend; None: the checkpoint the artifacts came from
    prompt_chunk: int | None = None  # tokens per encoder pass; None: the engine's new_tokens maximum, else 4096


@dataclass
class CanvasText:
    """One committed canvas as streamed: the event, and per row its text (None without a tokenizer)."""

    event: CanvasEvent
    rows: list[list[int]]  # the canvas's tokens per row, padding dropped
    text: list[str] | None


@dataclass
class GenerateResult:
    prompts: list[list[int]]
    sequences: list[list[int]]  # prompt (left-padded) included, as generate() returns them
    prompt_length: int
    stats: dict
    backend: str
    seed: int
    execution: str  # how the backend ran the artifacts (native, emulated, stand-ins)
    text: list[str] | None = None  # the generated text per row, when there is a tokenizer
    prompt_text: list[str] | None = field(default=None)

    def to_json(self) -> str:
        out = dict(sequences=self.sequences, backend=self.backend, seed=self.seed, execution=self.execution,
                   **self.stats)  # fmt: skip
        if self.text is not None:
            out["text"] = self.text
        return json.dumps(out)


def _prompts(options: GenerateOptions, tokenizer) -> list[list[int]]:  # noqa: ANN001
    if options.prompts and options.prompt_ids:
        raise DllmError("pass either --prompt or --prompt-ids, not both")
    if options.prompts:
        if tokenizer is None:
            raise DllmError(
                f"{options.artifacts} has no tokenizer.json, so --prompt cannot be encoded; use --prompt-ids"
            )
        return [tokenizer(text)["input_ids"] for text in options.prompts]
    if options.prompt_ids:
        if any(len(ids) == 0 for ids in options.prompt_ids):
            raise DllmError("--prompt-ids is empty; pass comma-separated token ids like 5,17,42")
        return [list(ids) for ids in options.prompt_ids]
    raise DllmError("no prompt: pass --prompt-ids 5,17,42 (or --prompt TEXT when the checkpoint has a tokenizer)")


def run(options: GenerateOptions, on_canvas: Callable[[CanvasText], None] | None = None) -> GenerateResult:
    """Generate from the prompts; `on_canvas` sees every committed canvas as it is committed."""
    if options.backend not in BACKENDS:
        raise DllmError(f"unknown backend '{options.backend}'; choose one of: {', '.join(BACKENDS)}")
    manifest = read_manifest(options.artifacts)
    tokenizer = load_tokenizer(options.artifacts)
    prompts = _prompts(options, tokenizer)
    vocab = manifest["model"]["vocab_size"]
    bad = [i for p in prompts for i in p if not 0 <= i < vocab]
    if bad:
        raise DllmError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    if options.max_new_tokens is not None and options.max_new_tokens <= 0:
        raise DllmError("--max-new-tokens must be a positive integer")
    if options.max_denoising_steps is not None and options.max_denoising_steps <= 0:
        raise DllmError("--max-denoising-steps must be a positive integer")
    if options.prompt_chunk is not None and options.prompt_chunk <= 0:
        raise DllmError("--prompt-chunk must be a positive integer (tokens per prompt pass)")
    settings = GenerationSettings.from_generation_config(
        generation_config(options.artifacts), max_new_tokens=options.max_new_tokens,
        max_denoising_steps=options.max_denoising_steps,
    )  # fmt: skip
    step = open_step(options.artifacts, options.backend, options.device, options.checkpoint)
    pad = manifest["model"]["pad_token_id"] or 0
    input_ids, mask = left_pad(prompts, pad)

    def decode(rows: list[list[int]]) -> list[str] | None:
        return None if tokenizer is None else [tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    def stream(event: CanvasEvent) -> None:
        rows = [[t for t in tokens if t != pad] for tokens in event.tokens.tolist()]
        on_canvas(CanvasText(event, rows, decode(rows)))

    result = generate(step, settings, input_ids, mask, seed=options.seed, on_canvas=stream if on_canvas else None,
                      prompt_chunk=options.prompt_chunk)  # fmt: skip
    sequences = result.sequences.tolist()
    return GenerateResult(
        prompts=prompts, sequences=sequences, prompt_length=input_ids.shape[1], stats=result.stats(),
        backend=options.backend, seed=options.seed, execution=getattr(step, "execution", "native"),
        text=decode([s[input_ids.shape[1]:] for s in sequences]), prompt_text=decode(prompts),
    )  # fmt: skip
