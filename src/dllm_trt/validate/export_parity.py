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
from dllm_trt.runtime.sampler import sampling_head, sampling_noise
from dllm_trt.runtime.step import LogitsStep
from dllm_trt.validate.compare import Comparison, agreement, compare, tolerance_for
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
def step_parity(
    model,
    step,
    seed: int = 0,
    context: int | None = None,
    tolerance_dtype: str | None = None,  # noqa: ANN001
) -> ParityResult:
    """`tolerance_dtype` judges by another dtype's tolerance (a bf16 graph measured through fp32 emulation)."""
    text = model.config.text_config
    window, canvas, vocab = text.sliding_window, model.config.canvas_length, text.vocab_size
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    if context is None:
        context = window + 3 if window + 3 <= MAX_CHEAP_CONTEXT else 32
    io_dtype = step.info.dtype  # the graphs' float inputs: the checkpoint's dtype, or the optimized precision
    dtype_name = tolerance_dtype or str(io_dtype).removeprefix("torch.")
    tolerance = tolerance_for(dtype_name)
    result = ParityResult(seed, dtype_name, context, context >= window)
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
    ours = StaticKVCache(layer_specs(model), batch, context + canvas, window, io_dtype)
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
    positions = torch.arange(context + canvas, context + 2 * canvas)[None, :].expand(batch, -1).contiguous()
    zeros = torch.zeros(batch, canvas, text.hidden_size, dtype=io_dtype)
    temperature = torch.tensor(0.6)
    processed = None
    for label, self_conditioning_logits in (("first step", None), ("later step", "previous")):
        canvas_ids = torch.randint(0, vocab, (batch, canvas), generator=gen)
        if self_conditioning_logits is None:
            sc_input = zeros
        else:
            self_conditioning_logits = processed.to(model.dtype)  # as the sampler hands it on
            sc_input = soft_embedding(model, self_conditioning_logits).to(io_dtype)
        expected = reference_denoise(model, reference, canvas_ids, self_conditioning_logits, history, positions[:1])
        processed = expected / temperature
        args = (canvas_ids, sc_input, positions, ours.mask(), ours.tensors())
        if isinstance(step, LogitsStep):
            result.comparisons.append(
                compare(f"denoise {label} logits", step.denoise(*args), expected, tolerance, argmax=True)
            )
            result.comparisons.append(
                compare(f"denoise {label} self-conditioning", step.soft_embedding(processed.to(io_dtype)),
                        soft_embedding(model, processed.to(model.dtype)), tolerance)
            )  # fmt: skip
            continue
        noise = sampling_noise(batch, canvas, vocab, gen)
        head = sampling_head(processed, noise)
        actual = step.denoise_and_sample(*args, temperature, noise)
        result.comparisons += [
            compare(f"denoise {label} entropy", actual.entropy, head.entropy, tolerance),
            agreement(f"denoise {label} argmax", actual.argmax, head.argmax, tolerance),
            agreement(f"denoise {label} sampled token", actual.sampled, head.sampled, tolerance),
            compare(f"denoise {label} self-conditioning", actual.next_self_conditioning,
                    soft_embedding(model, processed.to(model.dtype)), tolerance),
        ]  # fmt: skip
    return result
