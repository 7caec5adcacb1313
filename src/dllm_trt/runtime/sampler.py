"""The entropy-bound sampler of transformers' generation_diffusion_gemma.py, as backend-free tensor code.

Every function mirrors one piece of the reference (named in its docstring) with the same tensor
operations in the same order, so that on the same logits it gives the same bits. Random draws go
through an explicit `torch.Generator` in the order the reference makes them from the global one:
per canvas one `randint` (the initial canvas); per denoise step the exponential noise inside
`torch.multinomial` (drawn here explicitly, see `sampling_noise`), then one `randint` (re-noising).
Letters: B batch, C canvas, V vocab, S stability history length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplerSettings:
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float


def temperature(settings: SamplerSettings, cur_step: int) -> torch.Tensor:
    """LinearTemperatureScheduleLogitsProcessor: `cur_step` counts the steps *remaining* (N..1).

    The reference turns `cur_step` into an int32 tensor first, so the schedule is evaluated in
    float32; a float64 temperature would differ in the last bit and so would the logits.
    """
    step = torch.tensor(cur_step, dtype=torch.int32)
    return settings.t_min + ((settings.t_max - settings.t_min) * (step / settings.max_denoising_steps))


def random_canvas(batch: int, canvas: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """EntropyBoundSampler.initialize_canvas: uniform token ids [B, C]."""
    return torch.randint(0, vocab, (batch, canvas), generator=generator, device=generator.device)


def sampling_noise(batch: int, canvas: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """The Exp(1) noise `torch.multinomial(probs, 1)` draws internally, drawn explicitly.

    torch's multinomial for one sample computes argmax(probs / q) with q ~ Exp(1) of the probs'
    shape [B*C, V]; drawing q here with the same generator consumes the same random stream, and
    lets a graph that never hands its logits out sample the very same token.
    """
    return torch.empty(batch * canvas, vocab, device=generator.device).exponential_(1, generator=generator)


@dataclass
class HeadOutput:
    """What the sampler needs from one denoise step, whichever side computed it. All [B, C]."""

    sampled: torch.Tensor  # token drawn from softmax(processed logits)
    argmax: torch.Tensor  # argmax of the processed logits
    entropy: torch.Tensor  # entropy of Categorical(logits=processed logits)


def sampling_head(processed_logits: torch.Tensor, noise: torch.Tensor) -> HeadOutput:
    """_denoising_step 1.c.ii on processed logits [B, C, V]: sample, argmax, token entropy."""
    batch, canvas, vocab = processed_logits.shape
    probs = torch.softmax(processed_logits, dim=-1, dtype=torch.float32)
    sampled = torch.argmax(probs.view(-1, vocab) / noise, dim=-1).view(batch, canvas)
    argmax = torch.argmax(processed_logits, dim=-1)
    entropy = torch.distributions.Categorical(logits=processed_logits).entropy()
    return HeadOutput(sampled, argmax, entropy)


def accepted_positions(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """EntropyBoundSampler.accept_canvas: the lowest-entropy positions whose entropy sum, less its
    maximum, stays within the bound. [B, C] float -> [B, C] bool."""
    sorted_entropy, sorted_indices = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    selection = cumulative - sorted_entropy <= entropy_bound
    return torch.scatter(input=torch.zeros_like(selection), dim=-1, index=sorted_indices, src=selection)


class StableAndConfident:
    """StableAndConfidentStoppingCriteria: stop a row when its argmax canvas held for
    `stability_threshold` steps and the mean token entropy is below `confidence_threshold`."""

    def __init__(self, stability_threshold: int, confidence_threshold: float) -> None:
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: torch.Tensor | None = None  # [S, B, C]

    def reset(self) -> None:
        self.history = None

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        if self.stability_threshold == 0:
            stable = torch.ones(argmax.shape[0], device=argmax.device, dtype=torch.bool)
        else:
            if self.history is None:
                self.history = torch.full(
                    (self.stability_threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device
                )
            stable = (self.history == argmax[None, :, :]).all(dim=-1).all(dim=0)
            self.history = torch.roll(self.history, shifts=-1, dims=0)
            self.history[-1] = argmax
        confident = torch.mean(entropy, dim=-1) < self.confidence_threshold
        return stable & confident
