"""How a long prompt is cut into encoder passes: the one rule the loop runs and `plan` counts.

A prompt of L tokens is encoded in passes of at most `chunk` tokens, each an encoder pass over the
cache the earlier ones filled: causal, with the sliding window reaching across pass boundaries
(a sliding layer's cache keeps the last window - 1 positions, exactly what the first query of the
next pass may see). So the passes compute what one pass over the whole prompt computes, while the
largest pass, not the prompt, sets the activations: the scores of attention without a fused kernel
and the MoE's intermediates grow with the tokens of a pass, not with the prompt.

Protected spans (an image's tokens, once images reach the loop) are never split: a pass that would
end inside one ends before it instead, and a span longer than `chunk` gets a pass of its own, as
long as the span. The caller passes spans in the coordinates of the (left-padded) token tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

from dllm_trt.errors import DllmError

# Tokens per encoder pass when neither the user nor the backend says: the GPU presets' default
# new_tokens maximum (trt.gpu_presets), so an engine built with defaults takes it.
DEFAULT_PROMPT_CHUNK = 4096

Span = tuple[int, int]  # [start, end) in token positions


def chunk_spans(length: int, chunk: int, protected: Sequence[Span] = ()) -> list[Span]:
    """The [start, end) of each encoder pass over `length` tokens (module docstring)."""
    if chunk < 1:
        raise ValueError(f"a prompt chunk holds at least one token, not {chunk}")
    for a, b in protected:
        if not 0 <= a < b <= length:
            raise ValueError(f"protected span [{a}, {b}) is empty or outside the {length} tokens")
    # Spans that overlap (images of different rows over the same columns of the batch) are kept whole together.
    spans: list[Span] = []
    for a, b in sorted(protected):
        if spans and a < spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    passes, start = [], 0
    while start < length:
        end = min(start + chunk, length)
        for a, b in spans:
            if a < end < b:  # the pass would split this span
                end = a if a > start else b
                break
        passes.append((start, end))
        start = end
    return passes


def largest_passes(length: int, chunk: int, protected: Sequence[Span] = ()) -> dict[int, int]:
    """tokens of a pass -> the most positions cached before a pass of that size: what a memory bound needs
    (a pass costs more with more tokens and with more cache, so only these pairs can be the largest)."""
    worst: dict[int, int] = {}
    for start, end in chunk_spans(length, chunk, protected):
        worst[end - start] = max(worst.get(end - start, 0), start)
    return worst


def resolve_prompt_chunk(requested: int | None, backend_max: int | None) -> int:
    """The chunk a generation uses: the one asked for, else the backend's largest pass (an engine's
    new_tokens profile maximum), else DEFAULT_PROMPT_CHUNK; one line when it cannot be honoured."""
    if requested is None:
        return backend_max or DEFAULT_PROMPT_CHUNK
    if requested < 1:
        raise DllmError(f"--prompt-chunk {requested}: a prompt pass holds at least one token")
    if backend_max is not None and requested > backend_max:
        raise DllmError(
            f"--prompt-chunk {requested}: the engine takes at most {backend_max} new tokens per pass (its new_tokens "
            f"profile); pass --prompt-chunk {backend_max} or less, or rebuild with --profile new_tokens=1:...:"
            f"{requested}"
        )
    return requested
