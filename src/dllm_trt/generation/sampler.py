"""The entropy-bound sampler of transformers' generation_diffusion_gemma.py, as backend-free tensor code.

Every function mirrors one piece of the reference (named in its docstring) with the same tensor
operations in the same order, so that on the same logits it gives the same bits. Random draws go
through an explicit `torch.Generator` in the order the reference makes them from the global one:
per canvas one `randint` (the initial canvas); per denoise step the exponential noise inside
`torch.multinomial` (drawn here explicitly, see `sampling_noise`), then one `randint` (re-noising).
Letters: B batch, C canvas, V vocab, S stability history length.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from dllm_trt.generation import exponential_noise


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
    lets a graph that never hands its logits out sample the very same token. On the CPU the same
    bits come from numpy, faster (see generation.exponential_noise), where that is checked to hold.
    """
    if generator.device.type == "cpu" and exponential_noise.reproduces_torch():
        return exponential_noise.exponential(generator, batch * canvas * vocab).view(batch * canvas, vocab)
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
    # the reference's Categorical entropy; without argument validation, which reads a device flag on the host
    # (a CUDA-graph capture of the step forbids that), the same arithmetic
    entropy = torch.distributions.Categorical(logits=processed_logits, validate_args=False).entropy()
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


class RandomDraws:
    """The loop's random draws in the reference's order, the next step's drawn while this one runs.

    Per denoise step the reference draws the multinomial noise [B*C, V], then the re-noising ids
    [B, C]; neither depends on the step's result, so on the CPU the next step's pair is drawn on a
    worker thread while the backend computes the current step (the noise is as costly as a small
    model's whole denoise step). When a canvas ends instead, the generator is rolled back to the
    state the reference would be in, so the stream stays the reference's.
    """

    def __init__(
        self, generator: torch.Generator, batch: int, canvas: int, vocab: int, pool: Executor | None = None
    ) -> None:
        """`pool`: a worker pool shared by many draws (one per request of a scheduler), left open on close;
        without one, a CPU generator gets a worker of its own."""
        self.generator = generator
        self.shape = (batch, canvas, vocab)
        self.pool, self.own_pool = None, False
        if generator.device.type == "cpu":  # CUDA draws are asynchronous already
            from concurrent.futures import ThreadPoolExecutor

            self.pool, self.own_pool = pool or ThreadPoolExecutor(1, thread_name_prefix="dllm-trt-draws"), pool is None
        self.pending = None
        self.state_before_pending: torch.Tensor | None = None

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, canvas, vocab = self.shape
        noise = sampling_noise(batch, canvas, vocab, self.generator)
        return noise, random_canvas(batch, canvas, vocab, self.generator)

    def canvas(self) -> torch.Tensor:
        """The initial canvas: never drawn ahead (a canvas may not come)."""
        self.rollback()
        batch, canvas, vocab = self.shape
        return random_canvas(batch, canvas, vocab, self.generator)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(multinomial noise [B*C, V], re-noising ids [B, C]) for this step; starts drawing the next."""
        if self.pending is not None:
            draws = self.pending.result()
        else:
            draws = self._draw()
        self.pending = None
        if self.pool is not None:
            self.state_before_pending = self.generator.get_state()
            self.pending = self.pool.submit(self._draw)
        return draws

    def rollback(self) -> None:
        """Undo a draw made ahead for a step that did not happen."""
        if self.pending is not None:
            self.pending.result()
            self.generator.set_state(self.state_before_pending)
            self.pending = None

    def close(self) -> None:
        self.rollback()
        if self.own_pool:
            self.pool.shutdown(wait=True)
