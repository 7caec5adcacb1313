"""`dllm-trt generate`: `run(GenerateOptions) -> GenerateResult`; prompts (and images) in, canvases
handed to a callback as they are committed, sequences, text and stats out.

Images: read and checked (generation.image_inputs), processed by transformers' Gemma 4 image
processor, their placeholders expanded in the prompt as the processor expands them, their soft
tokens computed by the backend's vision tower (a vision graph, or transformers' own) and merged into
the prompt's encoder pass by the step."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dllm_trt.contract import DEFAULT_MAX_SOFT_TOKENS
from dllm_trt.errors import DllmError
from dllm_trt.generation.backends import BACKENDS, open_step
from dllm_trt.generation.image_inputs import (
    ProcessedImages,
    expand_prompt_ids,
    expand_prompt_text,
    image_processor,
    process_images,
    read_image,
)
from dllm_trt.generation.images import PromptImages
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
    # Images, in the order of their places in the prompts: the tokenizer's image token in --prompt text, the
    # checkpoint's image_token_id in --prompt-ids (each written once; expanded to <boi> <image> x n <eoi>).
    images: tuple[Path, ...] = ()
    max_soft_tokens: int = DEFAULT_MAX_SOFT_TOKENS  # soft tokens per image at most: 70, 140, 280, 560, 1120


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


def _prompts(
    options: GenerateOptions, tokenizer, vision: dict | None, counts: list[int]  # noqa: ANN001
) -> list[list[int]]:
    """The prompts as token ids, each image's placeholder expanded to its `<boi> <image> x n <eoi>`."""
    if options.prompts and options.prompt_ids:
        raise DllmError("pass either --prompt or --prompt-ids, not both")
    tokens = iter(counts)
    if options.prompts:
        if tokenizer is None:
            raise DllmError(
                f"{options.artifacts} has no tokenizer.json, so --prompt cannot be encoded; use --prompt-ids"
            )
        texts = list(options.prompts)
        if vision is not None:
            names = _image_token_names(tokenizer, vision)
            found = sum(text.count(names[0]) for text in texts)
            if found != len(counts):
                raise DllmError(
                    f"--prompt holds {found} image placeholder(s) '{names[0]}' for {len(counts)} --image file(s); "
                    f"write '{names[0]}' in the prompt where each image goes"
                )
            texts = [expand_prompt_text(text, tokens, *names) for text in texts]
        return [tokenizer(text)["input_ids"] for text in texts]
    if options.prompt_ids:
        if any(len(ids) == 0 for ids in options.prompt_ids):
            raise DllmError("--prompt-ids is empty; pass comma-separated token ids like 5,17,42")
        prompts = [list(ids) for ids in options.prompt_ids]
        if vision is None:
            return prompts
        image = vision["image_token_id"]
        found = sum(ids.count(image) for ids in prompts)
        if found != len(counts):
            raise DllmError(
                f"--prompt-ids holds the image token {image} {found} time(s) for {len(counts)} --image file(s); "
                f"write {image} once where each image goes"
            )
        return expand_prompt_ids(prompts, tokens, vision["boi_token_id"], image, vision["eoi_token_id"])
    raise DllmError("no prompt: pass --prompt-ids 5,17,42 (or --prompt TEXT when the checkpoint has a tokenizer)")


def _image_token_names(tokenizer, vision: dict) -> tuple[str, str, str]:  # noqa: ANN001
    """The image, begin-of-image and end-of-image tokens as text (the tokenizer's, else its names of the ids)."""
    names = []
    for kind in ("image", "boi", "eoi"):
        named = getattr(tokenizer, f"{kind}_token", None)
        names.append(named or tokenizer.convert_ids_to_tokens(vision[f"{kind}_token_id"]))
    return tuple(names)


def _images(options: GenerateOptions, manifest: dict) -> ProcessedImages | None:
    """The images read, checked and processed, or None without --image; one line per bad input."""
    if not options.images:
        return None
    vision = manifest["model"].get("vision")
    if vision is None:
        raise DllmError(
            f"{options.artifacts} was exported from a text-only checkpoint (no vision tower): it cannot take "
            "--image; export a checkpoint that holds one"
        )
    pictures = [read_image(Path(path)) for path in options.images]
    processor = image_processor(options.artifacts, vision["patch_size"], vision["pooling_kernel_size"],
                                options.max_soft_tokens)  # fmt: skip
    return process_images(pictures, processor)


def _check_context(prompts: list[list[int]], manifest: dict, image_tokens: int) -> None:
    context = manifest["model"]["text_config"].get("max_position_embeddings")
    longest = max(len(p) for p in prompts)
    if context is not None and image_tokens and longest > context:
        raise DllmError(
            f"the prompt with its images is {longest} tokens ({image_tokens} of them image tokens), more than the "
            f"model's context of {context}; pass fewer images or a smaller --max-soft-tokens (70, 140, ...)"
        )


def run(options: GenerateOptions, on_canvas: Callable[[CanvasText], None] | None = None) -> GenerateResult:
    """Generate from the prompts; `on_canvas` sees every committed canvas as it is committed."""
    if options.backend not in BACKENDS:
        raise DllmError(f"unknown backend '{options.backend}'; choose one of: {', '.join(BACKENDS)}")
    manifest = read_manifest(options.artifacts)
    tokenizer = load_tokenizer(options.artifacts)
    processed = _images(options, manifest)
    vision = manifest["model"].get("vision") if processed is not None else None
    counts = processed.counts if processed is not None else []
    prompts = _prompts(options, tokenizer, vision, counts)
    image = (manifest["model"].get("vision") or {}).get("image_token_id")
    if vision is None and image is not None and any(image in p for p in prompts):
        raise DllmError(f"the prompt holds the image token {image} but no --image was given; pass one per place")
    _check_context(prompts, manifest, sum(counts))
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
    images = None
    if processed is not None:
        features = step.image_features(processed.pixel_values, processed.position_ids, processed.counts)
        images = PromptImages.locate(input_ids, vision["image_token_id"], features, vision["bidirectional"])

    def decode(rows: list[list[int]]) -> list[str] | None:
        return None if tokenizer is None else [tokenizer.decode(r, skip_special_tokens=True) for r in rows]

    def stream(event: CanvasEvent) -> None:
        rows = [[t for t in tokens if t != pad] for tokens in event.tokens.tolist()]
        on_canvas(CanvasText(event, rows, decode(rows)))

    result = generate(step, settings, input_ids, mask, seed=options.seed, on_canvas=stream if on_canvas else None,
                      prompt_chunk=options.prompt_chunk, images=images)  # fmt: skip
    sequences = result.sequences.tolist()
    stats = result.stats() | (dict(image_soft_tokens=counts) if counts else {})
    return GenerateResult(
        prompts=prompts, sequences=sequences, prompt_length=input_ids.shape[1], stats=stats,
        backend=options.backend, seed=options.seed, execution=getattr(step, "execution", "native"),
        text=decode([s[input_ids.shape[1]:] for s in sequences]), prompt_text=decode(prompts),
    )  # fmt: skip
