"""The sampler pieces give the reference's bits on the same inputs."""

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dllm_trt.generation.sampler import (
    SamplerSettings,
    StableAndConfident,
    accepted_positions,
    random_canvas,
    sampling_head,
    sampling_noise,
    temperature,
)

SETTINGS = SamplerSettings(48, 0.1, 0.4, 0.8, 1, 0.005)


def test_temperature_matches_the_logits_processor():
    logits = torch.randn(2, 5, 11)
    processor = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)
    for step in (48, 31, 7, 1):
        expected = processor(None, logits, cur_step=torch.tensor(step, dtype=torch.int32))
        assert torch.equal(logits / temperature(SETTINGS, step), expected)


def test_sampled_token_is_multinomial_with_the_same_generator():
    probs_logits = torch.randn(3, 16, 50) * 3
    torch.manual_seed(7)
    expected = torch.multinomial(torch.softmax(probs_logits, -1, dtype=torch.float32).view(-1, 50), 1).view(3, 16)
    generator = torch.Generator().manual_seed(7)
    head = sampling_head(probs_logits, sampling_noise(3, 16, 50, generator))
    assert torch.equal(head.sampled, expected)
    assert torch.equal(head.argmax, probs_logits.argmax(-1))
    assert torch.equal(head.entropy, torch.distributions.Categorical(logits=probs_logits).entropy())


def test_random_canvas_is_the_reference_initial_canvas():
    torch.manual_seed(3)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(0.1), canvas_length=9, vocab_size=77, max_denoising_steps=4)
    expected = sampler.initialize_canvas(2, torch.device("cpu"))
    assert torch.equal(random_canvas(2, 9, 77, torch.Generator().manual_seed(3)), expected)


def test_accepted_positions_match_accept_canvas():
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(2, 12, 30, generator=gen) * (seed + 1)
        sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(0.3), 12, 30, 8)
        current, proposed = torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)
        sampler.accept_canvas(current, proposed, logits, 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        assert torch.equal(accepted_positions(entropy, 0.3), sampler.accepted_token_mask)


def test_stopping_matches_stable_and_confident():
    reference = StableAndConfidentStoppingCriteria(stability_threshold=2, confidence_threshold=1.5)
    ours = StableAndConfident(stability_threshold=2, confidence_threshold=1.5)
    gen = torch.Generator().manual_seed(0)
    argmax = torch.randint(0, 5, (3, 4), generator=gen)
    for step in range(6):
        if step % 2:
            argmax = argmax.clone()
            argmax[0, 0] = (argmax[0, 0] + 1) % 5  # row 0 never stable
        logits = torch.randn(3, 4, 6, generator=gen) * (step + 1)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        assert torch.equal(ours(argmax, entropy), reference(argmax, logits))
