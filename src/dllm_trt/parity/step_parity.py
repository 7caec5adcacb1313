"""Step-level parity of a backend against transformers on fresh random inputs.

One scenario covers what the export must get right: batch 2 with prompts of different lengths
(left padding), a context longer than the sliding window when the window is small enough to pass
cheaply, a second encoder call over a committed canvas with a non-empty cache, the first denoise
step (no self-conditioning) and a later one (self-conditioning from processed logits).
Letters: B batch, L context, C canvas, H hidden, V vocab.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from dllm_trt.generation.kv_cache import StaticKVCache
from dllm_trt.generation.sampler import sampling_head, sampling_noise
from dllm_trt.generation.step import LogitsStep
from dllm_trt.models.diffusion_gemma import layer_specs, soft_embedding
from dllm_trt.parity.compare import (
    Comparison,
    EnvelopeVerdict,
    Tolerance,
    agreement,
    compare,
    group_name,
    judge_by_envelope,
    tolerance_for,
)
from dllm_trt.parity.reference import new_cache, reference_cache_tensors, reference_denoise, reference_encode

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
    # Reduced precision: the envelope verdicts, reported but not judged. Each backend runs the scenario
    # over its own cache, so a router flip of one prompt token (legitimate in that dtype, see
    # compare.EnvelopeVerdict) reaches every later call; the generation replay, where every call
    # starts from the reference's inputs, judges reduced precision. Judged here: finite outputs.
    verdicts: list[EnvelopeVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        if self.dtype != "float32":
            return [f"{c.name}: not finite" for c in self.comparisons if not c.finite]
        return [c.name for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict:
        return dict(
            seed=self.seed,
            dtype=self.dtype,
            context=self.context,
            exceeds_window=self.exceeds_window,
            passed=self.passed,
            comparisons=[c.to_dict() for c in self.comparisons],
            envelope_verdicts=[v.to_dict() for v in self.verdicts],
        )


@dataclass
class _Check:
    """One output of the scenario: the step's value and the reference's, compared as `kind`."""

    name: str
    kind: str  # "tensor" | "logits" (argmax agreement too) | "ids" (share of equal ids)
    actual: torch.Tensor
    expected: torch.Tensor
    valid: torch.Tensor | None = None
    features: int = 1  # trailing axes of one token's vector (0: every element is a token)

    def compare(self, tolerance: Tolerance) -> Comparison:
        if self.kind == "ids":
            return agreement(self.name, self.actual, self.expected, tolerance)
        logits = self.kind == "logits"
        return compare(self.name, self.actual, self.expected, tolerance, self.valid, logits, self.features)


def _cache_checks(label: str, ours: StaticKVCache, reference: list[torch.Tensor]) -> list[_Check]:
    checks = []
    for index, (actual, expected) in enumerate(zip(ours.tensors(), reference)):
        name = f"{label} {('key', 'value')[index % 2]}.{ours.specs[index // 2].index}"
        kept = actual.shape[2]
        valid = ours.mask()[:, ours.length - kept :][:, None, :, None]  # [B, 1, P, 1]
        # copies: the cache's tensors are views the next append rewrites in place
        checks.append(_Check(name, "tensor", actual.clone(), expected.clone(), valid.clone()))
    return checks


@torch.no_grad()
def step_parity(
    model,  # noqa: ANN001
    step,  # noqa: ANN001
    seed: int = 0,
    context: int | None = None,
    tolerance_dtype: str | None = None,
    envelope=None,  # noqa: ANN001
) -> ParityResult:
    """`step` against transformers (`model`) on fresh random inputs.

    `tolerance_dtype` names the artifact's dtype where it is not the step's own (a bf16 graph run
    through fp32 emulation). `envelope`, a Step of transformers itself in that dtype, run on the same
    inputs, makes the verdicts of a reduced-precision artifact (compare.judge_by_envelope); without
    one, reduced precision is judged by the informative bounds of compare.TOLERANCES.
    """
    text = model.config.text_config
    if context is None:
        context = text.sliding_window + 3 if text.sliding_window + 3 <= MAX_CHEAP_CONTEXT else 32
    dtype_name = tolerance_dtype or str(step.info.dtype).removeprefix("torch.")
    result = ParityResult(seed, dtype_name, context, context >= text.sliding_window)
    head = not isinstance(step, LogitsStep)  # judge what the step hands out: sampled results, or logits
    tolerance = tolerance_for(dtype_name)
    checks = _scenario(model, step, seed, context, head)
    result.comparisons = [c.compare(tolerance) for c in checks]
    if envelope is not None and dtype_name != "float32":
        strict = tolerance_for("float32")
        pairs = []
        for check, bound in zip(checks, _scenario(model, envelope, seed, context, head)):
            pairs.append((quantity(check.name), check.compare(tolerance), bound.compare(strict)))
            if check.kind == "logits":  # the argmax is a decision of its own
                ids = [_Check(check.name, "ids", c.actual.argmax(-1), c.expected.argmax(-1)) for c in (check, bound)]
                pairs.append((quantity(check.name) + " argmax", ids[0].compare(tolerance), ids[1].compare(strict)))
        result.verdicts = judge_by_envelope(pairs)
    return result


def quantity(name: str) -> str:
    """'encoder commit value.3' -> 'encoder key/value', 'denoise later step entropy' -> 'denoise entropy'."""
    name = re.sub(r" (prompt|commit|first step|later step)\b", "", name)
    return group_name(name)


def scenario_images(model, ids: torch.Tensor, valid: torch.Tensor, gen: torch.Generator):  # noqa: ANN001, ANN202
    """In place: image spans written into the prompt (two in row 0, one in the padded row 1, each as the
    processor writes it, boi + image tokens + eoi), with random soft tokens for them; a PromptImages."""
    from dllm_trt.generation.images import PromptImages

    config = model.config
    special = (config.image_token_id, config.boi_token_id, config.eoi_token_id)
    ids[torch.isin(ids, torch.tensor(special)) & valid] = 3  # no stray image token outside the spans
    context = ids.shape[1]
    size = max(1, min(5, context // 2 - 2))  # image tokens per image (2 or more from a context of 8 on)
    for row, start in ((0, 0), (0, size + 2), (1, context - size - 2)):
        ids[row, start : start + size + 2] = torch.tensor([config.boi_token_id, *[config.image_token_id] * size,
                                                           config.eoi_token_id])  # fmt: skip
    count = int((ids == config.image_token_id).sum())
    features = torch.randn(count, config.text_config.hidden_size, generator=gen).to(model.dtype)
    bidirectional = getattr(config.text_config, "use_bidirectional_attention", None) == "vision"
    return PromptImages.locate(ids, config.image_token_id, features, bidirectional)


def _scenario(model, step, seed: int, context: int, head: bool) -> list[_Check]:  # noqa: ANN001
    """Every output of `step` on the scenario's inputs, beside transformers' own."""
    text = model.config.text_config
    window, canvas, vocab = text.sliding_window, model.config.canvas_length, text.vocab_size
    pad = text.pad_token_id if text.pad_token_id is not None else 0
    io_dtype = step.info.dtype  # the graphs' float inputs: the checkpoint's dtype, or the optimized precision
    checks: list[_Check] = []
    gen = torch.Generator().manual_seed(seed)
    batch = 2

    # 1. prompt of two rows, the second left-padded by 3
    ids = torch.randint(3, vocab, (batch, context), generator=gen)
    lengths = torch.tensor([context, max(1, context - 3)])
    valid = torch.arange(context)[None, :] >= (context - lengths)[:, None]  # [B, L]
    ids[~valid] = pad
    positions = torch.arange(context)[None, :]
    images = scenario_images(model, ids, valid, gen) if getattr(step, "images", False) else None
    reference = new_cache(model)
    reference_encode(model, reference, ids, valid, positions, None if images is None else images.embeds)
    ours = StaticKVCache(layer_specs(model), batch, context + canvas, window, io_dtype)
    extra = {} if images is None else dict(images=images.for_pass(0, context))
    ours.append(step.encode(ids, positions.expand(batch, -1).contiguous(), valid, ours.mask(), ours.tensors(),
                            **extra), valid)  # fmt: skip
    checks += _cache_checks("encoder prompt" + (" with images" if images else ""), ours,
                            reference_cache_tensors(reference))  # fmt: skip

    # 2. commit a canvas: an encoder call with a non-empty cache
    committed = torch.randint(0, vocab, (batch, canvas), generator=gen)
    committed_valid = torch.ones(batch, canvas, dtype=torch.bool)
    positions = torch.arange(context, context + canvas)[None, :]
    history = torch.cat([valid, committed_valid], dim=1)
    reference_encode(model, reference, committed, history, positions)
    new = step.encode(committed, positions.expand(batch, -1).contiguous(), committed_valid, ours.mask(), ours.tensors())
    ours.append(new, committed_valid)
    checks += _cache_checks("encoder commit", ours, reference_cache_tensors(reference))

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
        expected_sc = soft_embedding(model, processed.to(model.dtype))
        args = (canvas_ids, sc_input, positions, ours.mask(), ours.tensors())
        if not head:
            checks += [
                _Check(f"denoise {label} logits", "logits", step.denoise(*args), expected),
                _Check(f"denoise {label} self-conditioning", "tensor",
                       step.soft_embedding(processed.to(io_dtype)), expected_sc),
            ]  # fmt: skip
            continue
        noise = sampling_noise(batch, canvas, vocab, gen)
        expected_head = sampling_head(processed, noise)
        actual = step.denoise_and_sample(*args, temperature, noise)
        checks += [
            _Check(f"denoise {label} entropy", "tensor", actual.entropy, expected_head.entropy, features=0),
            _Check(f"denoise {label} argmax", "ids", actual.argmax, expected_head.argmax),
            _Check(f"denoise {label} sampled token", "ids", actual.sampled, expected_head.sampled),
            _Check(f"denoise {label} self-conditioning", "tensor", actual.next_self_conditioning, expected_sc),
        ]
    return checks
