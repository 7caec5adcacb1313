"""The numpy draw of torch's CPU exponential noise: same bits, same generator state afterwards."""

import pytest
import torch

from dllm_trt.generation import exponential_noise
from dllm_trt.generation.sampler import sampling_noise


@pytest.mark.parametrize("seed", [0, 7, 123456789])
def test_same_bits_and_state_as_torch(seed: int) -> None:
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    # other draws first, so the twister sits mid-block; sizes around the 624-word block edge
    torch.randint(0, 97, (37,), generator=ours)
    torch.randint(0, 97, (37,), generator=theirs)
    for count in (1, 311, 312, 313, 624, 625, 3 * 8192):
        got = exponential_noise.exponential(ours, count)
        want = torch.empty(count).exponential_(1, generator=theirs)
        assert torch.equal(got, want), f"{count} values: {(got != want).sum().item()} differ"
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.randint(0, 1000, (64,), generator=ours), torch.randint(0, 1000, (64,), generator=theirs))


def test_sampler_uses_it_and_keeps_the_stream() -> None:
    assert exponential_noise.reproduces_torch()
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = sampling_noise(2, 5, 301, ours)
    assert noise.shape == (10, 301) and noise.dtype == torch.float32
    assert torch.equal(noise, torch.empty(10, 301).exponential_(1, generator=theirs))
    assert bool((noise > 0).all())
