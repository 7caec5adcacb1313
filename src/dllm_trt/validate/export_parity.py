"""Step-level parity of a backend against transformers on fresh random inputs.

One scenario covers what the export must get right: batch 2 with prompts of different lengths
(left padding), a context longer than the sliding window when the window is small enough to pass
cheaply, a second encoder call over a committed canvas with a non-empty cache, the first denoise
step (no self-conditioning) and a later one (self-conditioning from processed logits).
Letters: B batch, L context, C canvas, H hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dllm_trt.models.diffusion_gemma import layer_specs, soft_embedding
from dllm_trt.runtime.kv_cache import StaticKVCache
from dllm_trt.runtime.step import LogitsStep
from dllm_trt.validate.compare import Comparison, compare, tolerance_for
from dllm_trt.validate.reference import new_cache, reference_cache_tensors, reference_denoise, reference_encode

# A context that passes the sliding window costs window + canvas tokens through every expert of
# every layer; beyond this many tokens the scenario keeps to a short context and says so.
MAX_CHEAP_CONTEXT = 256


@dataclass
class ParityResult:
    seed: int
    dtype: str
    context: int
    exceeds_window: bool
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict:
        return dict(
            seed=self.seed,
            dtype=self.dtype,
            context=self.context,
            exceeds_window=self.exceeds_window,
            passed=self.passed,
            comparisons=[c.to_dict() for c in self.comparisons],
        )


def _compare_caches(
    label: str,
    ours: StaticKVCache,
    reference: list[torch.Tensor],
    result: ParityResult,
    tolerance,  # noqa: ANN001
) -> None:
    for index, (actual, expected) in enumerate(zip(ours.tensors(), reference)):
        name = f"{label} {('key', 'value')[index % 2]}.{ours.specs[index // 2].index}"
        kept = actual.shape[2]
        valid = ours.mask()[:, ours.length - kept :][:, None, :, None]  # [B, 1, P, 1]
        result.comparisons.append(compare(name, actual, expected, tolerance, valid))


@torch.no_grad()
def step_parity(model, step: LogitsStep, seed: int = 0, context: int | None = None) -> ParityResult:  # noqa: ANN001
    text = model.config.text_config
    window, canvas, vocab = text.sliding_window, model.config.canvas_length, text.vocab_size
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    if context is None:
        context = window + 3 if window + 3 <= MAX_CHEAP_CONTEXT else 32
    tolerance = tolerance_for(model.dtype)
    result = ParityResult(seed, str(model.dtype).removeprefix("torch."), context, context >= window)
    gen = torch.Generator().manual_seed(seed)
    batch = 2

    # 1. prompt of two rows, the second left-padded by 3
    ids = torch.randint(3, vocab, (batch, context), generator=gen)
    lengths = torch.tensor([context, max(1, context - 3)])
    valid = torch.arange(context)[None, :] >= (context - lengths)[:, None]  # [B, L]
    ids[~valid] = pad
    positions = torch.arange(context)[None, :]
    reference = new_cache(model)
    reference_encode(model, reference, ids, valid, positions)
    ours = StaticKVCache(layer_specs(model), batch, context + canvas, window, model.dtype)
    ours.append(step.encode(ids, positions.expand(batch, -1).contiguous(), valid, ours.mask(), ours.tensors()), valid)
    _compare_caches("encoder prompt", ours, reference_cache_tensors(reference), result, tolerance)

    # 2. commit a canvas: an encoder call with a non-empty cache
    committed = torch.randint(0, vocab, (batch, canvas), generator=gen)
    committed_valid = torch.ones(batch, canvas, dtype=torch.bool)
    positions = torch.arange(context, context + canvas)[None, :]
    history = torch.cat([valid, committed_valid], dim=1)
    reference_encode(model, reference, committed, history, positions)
    new = step.encode(committed, positions.expand(batch, -1).contiguous(), committed_valid, ours.mask(), ours.tensors())
    ours.append(new, committed_valid)
    _compare_caches("encoder commit", ours, reference_cache_tensors(reference), result, tolerance)

    # 3. denoise: the first step (zero self-conditioning) and a later one
    positions = torch.arange(context + canvas, context + 2 * canvas)[None, :]
    canvas_ids = torch.randint(0, vocab, (batch, canvas), generator=gen)
    zeros = torch.zeros(batch, canvas, text.hidden_size, dtype=model.dtype)
    expected = reference_denoise(model, reference, canvas_ids, None, history, positions)
    actual = step.denoise(canvas_ids, zeros, positions.expand(batch, -1).contiguous(), ours.mask(), ours.tensors())
    result.comparisons.append(compare("denoise first step logits", actual, expected, tolerance, argmax=True))

    processed = (expected / 0.6).to(model.dtype)  # temperature-scaled, as the sampler hands it on
    canvas_ids = torch.randint(0, vocab, (batch, canvas), generator=gen)
    expected = reference_denoise(model, reference, canvas_ids, processed, history, positions)
    actual = step.denoise(
        canvas_ids,
        soft_embedding(model, processed),
        positions.expand(batch, -1).contiguous(),
        ours.mask(),
        ours.tensors(),
    )
    result.comparisons.append(compare("denoise later step logits", actual, expected, tolerance, argmax=True))
    return result
