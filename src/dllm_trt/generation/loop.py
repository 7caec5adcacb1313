"""The block-diffusion generation loop of transformers' `DiffusionGemmaGenerationMixin.generate()`,
over any backend's Step. The loop never changes; backends differ only in their Step object.

Per canvas: the encoder step appends the new tokens' K/V to the runtime's cache (in passes of at most
`prompt_chunk` tokens, generation.prompt_chunks: what one pass computes, in bounded memory); a random canvas
is denoised for up to `max_denoising_steps` steps (sample, accept by entropy bound, re-noise the
rest, stop a row when stable and confident); the argmax canvas is committed and EOS handled.
Letters: B batch, L sequence so far, C canvas, H hidden, V vocab.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dllm_trt.generation.images import PromptImages
from dllm_trt.generation.kv_cache import StaticKVCache
from dllm_trt.generation.prompt_chunks import Span, chunk_spans, resolve_prompt_chunk
from dllm_trt.generation.sampler import (
    RandomDraws,
    SamplerSettings,
    StableAndConfident,
    accepted_positions,
    temperature,
)

# transformers' DiffusionGemmaGenerationConfig._get_default_generation_params
REFERENCE_DEFAULTS = dict(
    max_new_tokens=256, max_denoising_steps=48, entropy_bound=0.1, t_min=0.4, t_max=0.8,
    stability_threshold=1, confidence_threshold=0.005,
)  # fmt: skip


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    sampler: SamplerSettings
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def from_generation_config(cls, config: dict, **overrides: object) -> GenerationSettings:
        """Resolve a generation_config.json dict the way `generate()` does: file, then global defaults."""
        values = {k: config.get(k) for k in REFERENCE_DEFAULTS}
        sampler_config = config.get("sampler_config") or {}
        values["entropy_bound"] = sampler_config.get("entropy_bound") if isinstance(sampler_config, dict) else None
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key, default in REFERENCE_DEFAULTS.items():
            if values.get(key) is None:
                values[key] = default
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            max_new_tokens=int(values["max_new_tokens"]),
            sampler=SamplerSettings(
                max_denoising_steps=int(values["max_denoising_steps"]),
                entropy_bound=float(values["entropy_bound"]),
                t_min=float(values["t_min"]),
                t_max=float(values["t_max"]),
                stability_threshold=int(values["stability_threshold"]),
                confidence_threshold=float(values["confidence_threshold"]),
            ),
            eos_token_ids=eos,
            pad_token_id=config.get("pad_token_id"),
        )


@dataclass
class CanvasEvent:
    """One committed canvas, as streamed: tokens after EOS handling [B, C] and steps per row."""

    index: int
    tokens: torch.Tensor
    steps: list[int]
    finished: list[bool]


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, L] prompt included, as generate() returns it
    tokens_per_forward: list[float]
    steps_per_canvas: list[list[int]]  # [canvas][row]: denoise steps that row counted
    calls_per_canvas: list[int]  # [canvas]: denoise calls the batch made (the reference's forward passes)
    decoder_forward_passes: list[int]
    new_tokens: int  # non-pad generated tokens over the batch
    seconds: float
    encode_seconds: float = 0.0
    denoise_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    def stats(self) -> dict:
        steps = [s for canvas in self.steps_per_canvas for s in canvas]
        ordered = sorted(self.step_seconds)
        return dict(
            new_tokens=self.new_tokens,
            seconds=round(self.seconds, 4),
            tokens_per_second=round(self.new_tokens / self.seconds, 2) if self.seconds else None,
            canvases=len(self.steps_per_canvas),
            denoise_steps_per_canvas=self.steps_per_canvas,
            mean_denoise_steps_per_canvas=round(sum(steps) / len(steps), 3) if steps else 0.0,
            tokens_per_forward=[round(t, 4) for t in self.tokens_per_forward],
            denoise_calls_per_canvas=self.calls_per_canvas,
            step_ms_median=round(1e3 * ordered[len(ordered) // 2], 3) if ordered else None,
            step_ms_p90=round(1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3) if ordered else None,
            encode_seconds=round(self.encode_seconds, 4),
            denoise_seconds=round(self.denoise_seconds, 4),
        )


def finalize_canvas(
    sequences: torch.Tensor,
    finished: torch.Tensor,
    canvas: int,
    max_length: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """generate()'s _finalize_canvas with its stopping criteria (MaxLength, then EOS in the canvas)."""
    device = sequences.device
    done_now = torch.full((sequences.shape[0],), sequences.shape[1] >= max_length, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_token_ids, dtype=sequences.dtype, device=device) if eos_token_ids else None
    if eos is not None:
        done_now = done_now | torch.isin(sequences[:, -canvas:], eos).any(dim=-1)
    previously = finished
    finished = previously | done_now
    if pad_token_id is not None and torch.any(finished):
        sequences[previously, -canvas:] = pad_token_id
        if eos is not None and torch.any(done_now):
            new_tokens = sequences[:, -canvas:]
            is_eos = torch.isin(new_tokens, eos)
            eos_cumsum = is_eos.cumsum(dim=-1)
            pad_mask = (eos_cumsum > 0) & ~((eos_cumsum == 1) & is_eos)
            new_tokens[pad_mask] = pad_token_id
    return sequences, finished


class CanvasState:
    """One canvas being denoised for B rows: the loop's steps 1.b and 1.c, one denoise call at a time.

    `generate` below drives it over a batch; generation.scheduler drives one per request and batches
    the calls of requests at different steps. Either way each row sees the reference's arithmetic.
    """

    def __init__(self, current: torch.Tensor, sampler: SamplerSettings, hidden: int, dtype: torch.dtype) -> None:
        batch, canvas = current.shape
        device = current.device
        self.sampler = sampler
        self.current = current  # [B, C] the canvas the next step reads
        self.argmax = current  # [B, C] what a commit now would commit
        self.self_conditioning = torch.zeros(batch, canvas, hidden, dtype=dtype, device=device)  # [B, C, H]
        self.entropy = torch.zeros(batch, canvas, device=device)  # [B, C]
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B] finished denoising
        self.steps = torch.zeros(batch, dtype=torch.int, device=device)  # [B] steps each row counted
        self.stopping = StableAndConfident(sampler.stability_threshold, sampler.confidence_threshold)
        self.remaining = sampler.max_denoising_steps  # the reference's cur_step: N down to 1
        self.calls = 0

    @classmethod
    def start(cls, draws: RandomDraws, info, sampler: SamplerSettings) -> CanvasState:  # noqa: ANN001 (StepInfo)
        """1.b: a fresh random canvas (drawn on the step's device), no self-conditioning, stopping reset."""
        return cls(draws.canvas(), sampler, info.hidden_size, info.dtype)

    @property
    def done(self) -> bool:
        return self.remaining == 0 or bool(torch.all(self.finished))

    def count(self, finished_sequences: torch.Tensor) -> torch.Tensor:
        """Rows this step counts (neither finished denoising nor finished), added to `steps`."""
        counted = ~(self.finished | finished_sequences)
        self.steps += counted
        return counted

    def step_temperature(self) -> torch.Tensor:
        """The schedule's temperature for the coming step (0-d, float32)."""
        return temperature(self.sampler, self.remaining)

    def advance(self, out, renoised: torch.Tensor) -> None:  # noqa: ANN001 (generation.step.DenoiseSample)
        """1.c after the step: accept, re-noise the rest, keep finished rows, update the stopping state."""
        accepted = accepted_positions(out.entropy, self.sampler.entropy_bound)
        # accept_canvas then renoise_canvas: accepted positions take the sample, the rest fresh noise
        new_current = torch.where(accepted, out.sampled, renoised)
        new_argmax, entropy, next_sc = out.argmax, out.entropy, out.next_self_conditioning
        if self.finished.any():
            keep = self.finished[:, None]
            new_argmax = torch.where(keep, self.argmax, new_argmax)
            new_current = torch.where(keep, self.current, new_current)
            entropy = torch.where(keep, self.entropy, entropy)
            next_sc = torch.where(keep[:, :, None], self.self_conditioning, next_sc)
        self.finished |= self.stopping(new_argmax, entropy)
        self.current, self.argmax, self.self_conditioning, self.entropy = new_current, new_argmax, next_sc, entropy
        self.remaining -= 1
        self.calls += 1


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> input_ids [B, L] and attention_mask [B, L] (left padding)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = True
    return ids, mask


@torch.no_grad()
def generate(
    step,  # noqa: ANN001 (generation.step.Step)
    settings: GenerationSettings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    seed: int = 0,
    on_canvas: Callable[[CanvasEvent], None] | None = None,
    prompt_chunk: int | None = None,
    protected_spans: Sequence[Span] = (),
    images: PromptImages | None = None,
) -> GenerationResult:
    """Token-for-token the reference's generate() under `torch.manual_seed(seed)`.

    `prompt_chunk`: the most tokens of one encoder pass (None: the backend's maximum, else
    prompt_chunks.DEFAULT_PROMPT_CHUNK); `protected_spans`: [start, end) ranges of `input_ids`'s columns
    no pass may split. `images`: the prompt's images (their spans in `input_ids` and soft tokens), merged
    into the prompt's encoder passes as the reference merges pixel_values, each image whole in one pass (its
    span protected); no later call sees them but through the cache."""
    info = step.info
    canvas, vocab = info.canvas_length, info.vocab_size
    device = torch.device(info.device)
    # On CUDA this is the generator torch.manual_seed() seeds there, as the reference uses.
    generator = torch.Generator(device=device).manual_seed(seed)
    draws = RandomDraws(generator, input_ids.shape[0], canvas, vocab)
    chunk = resolve_prompt_chunk(prompt_chunk, info.prompt_chunk_max)
    try:
        if images is not None:
            protected_spans = (*protected_spans, *((span.start, span.stop) for span in images.spans))
        protected = tuple(protected_spans)
        return _generate(step, settings, input_ids, attention_mask, draws, on_canvas, chunk, protected, images)
    finally:
        draws.close()


def _encode(step, cache: StaticKVCache, pending: torch.Tensor, valid: torch.Tensor, chunk: int,
            protected: tuple[Span, ...], images: PromptImages | None) -> None:  # noqa: ANN001  # fmt: skip
    """Encoder passes over the uncached tokens [B, T], each over the cache the previous ones filled; each image
    of the prompt goes to the pass holding its span, whole (the reference's first encoder call takes them all)."""
    batch = pending.shape[0]
    for start, end in chunk_spans(pending.shape[1], chunk, protected):
        positions = torch.arange(cache.length, cache.length + end - start, device=pending.device)
        positions = positions.expand(batch, -1).contiguous()  # [B, end - start]
        part = valid[:, start:end]
        extra = {} if images is None else dict(images=images.for_pass(start, end))
        cache.append(step.encode(pending[:, start:end], positions, part, cache.mask(), cache.tensors(), **extra),
                     part)  # fmt: skip


def _generate(
    step, settings, input_ids, attention_mask, draws, on_canvas, chunk, protected, images  # noqa: ANN001
) -> GenerationResult:
    info = step.info
    canvas = info.canvas_length
    sampler = settings.sampler
    device = torch.device(info.device)
    start = time.perf_counter()

    input_ids = input_ids.to(device)
    batch, prompt_length = input_ids.shape
    max_length = settings.max_new_tokens + prompt_length
    max_new_canvases = math.ceil(settings.max_new_tokens / canvas)
    attention_mask = (
        torch.ones(batch, prompt_length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    ).to(device)
    cache = StaticKVCache(
        step.specs, batch, prompt_length + max_new_canvases * canvas, info.sliding_window, info.dtype, device
    )
    finished_sequences = torch.zeros(batch, dtype=torch.bool, device=device)
    forward_passes = torch.zeros(batch, dtype=torch.int, device=device)
    result = GenerationResult(input_ids, [], [], [], [], 0, 0.0)
    sequences = input_ids.clone()
    pending, pending_valid = sequences, attention_mask  # tokens the encoder has not seen yet

    for canvas_index in range(max_new_canvases):
        # 1.a encoder step over the uncached tokens, in passes of at most `chunk` (the prompt's spans kept whole)
        t0 = time.perf_counter()
        first = canvas_index == 0
        _encode(step, cache, pending, pending_valid, chunk, protected if first else (), images if first else None)
        cur_len = cache.length
        result.encode_seconds += time.perf_counter() - t0

        # 1.b a fresh random canvas, no self-conditioning, stopping state reset; 1.c denoise it
        state = CanvasState.start(draws, info, sampler)
        decoder_positions = torch.arange(cur_len, cur_len + canvas, device=device).expand(batch, -1).contiguous()
        while not state.done:
            forward_passes += state.count(finished_sequences)
            t0 = time.perf_counter()
            noise, renoised = draws.step()
            out = step.denoise_and_sample(
                state.current, state.self_conditioning, decoder_positions, cache.mask(), cache.tensors(),
                state.step_temperature(), noise,
            )  # fmt: skip
            state.advance(out, renoised)
            elapsed = time.perf_counter() - t0
            result.step_seconds.append(elapsed)
            result.denoise_seconds += elapsed
        argmax_canvas, steps, calls = state.argmax, state.steps, state.calls

        # 1.d/e commit the argmax canvas, handle EOS and padding of finished rows
        sequences = torch.cat([sequences, argmax_canvas], dim=-1)
        sequences, finished_sequences = finalize_canvas(
            sequences, finished_sequences, canvas, max_length, settings.eos_token_ids, settings.pad_token_id
        )
        result.steps_per_canvas.append(steps.tolist())
        result.calls_per_canvas.append(calls)
        if on_canvas is not None:
            on_canvas(CanvasEvent(canvas_index, sequences[:, -canvas:].clone(), steps.tolist(),
                                  finished_sequences.tolist()))  # fmt: skip
        if torch.all(finished_sequences):
            break
        # 1.f the committed canvas (after EOS padding) is the encoder's next input, every position valid
        pending, pending_valid = sequences[:, -canvas:], torch.ones(batch, canvas, dtype=torch.bool, device=device)

    result.sequences = sequences
    new = sequences[:, prompt_length:]
    valid = (new != settings.pad_token_id).sum(dim=-1) if settings.pad_token_id is not None else new.shape[1]
    valid = torch.as_tensor(valid, device=device).expand(batch)
    result.tokens_per_forward = (valid / forward_passes).tolist()
    result.decoder_forward_passes = forward_passes.tolist()
    result.new_tokens = int(valid.sum())
    result.seconds = time.perf_counter() - start
    return result
