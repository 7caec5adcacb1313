"""torch's CPU `Tensor.exponential_(1, generator=g)`, the same bits from the same stream, with numpy.

The loop draws B*C*V Exp(1) values per denoise step (the noise inside `torch.multinomial`); on the
CPU torch makes them one at a time (8.2 ms for 64 x 8192 on this machine), as long as a small
model's whole denoise step. numpy makes them in 5.0 ms from the same Mersenne Twister:

* torch's CPU generator is MT19937; `get_state()` holds its 624 words (stored as uint64) and
  `left` (outputs before the next twist), which numpy's `MT19937` takes as `key` and
  `pos = 625 - left`;
* each value takes two 32-bit outputs (hi, lo) as a 53-bit uniform u = ((hi << 32 | lo) & (2^53-1))
  * 2^-53 in float64, turned into -log1p(-u) in float64 and rounded to float32;
* the generator is handed back advanced by exactly the outputs used.

That is a reading of torch's implementation, so it is checked against torch itself once per
process (`reproduces_torch`); where it does not match (another torch, another generator layout)
the loop keeps torch's own draw. tests/runtime/test_exponential_noise.py checks it bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MT_WORDS = 624
STATE_BYTES = 5056  # CPUGeneratorImplState: seed, left, seeded, next, 624 words, normal cache
LEFT, NEXT, KEY = slice(8, 12), slice(16, 24), slice(24, 24 + MT_WORDS * 8)
MASK_53 = np.uint64((1 << 53) - 1)
SHIFT_32 = np.uint64(32)


def _numpy_twister(state: np.ndarray) -> np.random.MT19937:
    twister = np.random.MT19937()
    left = int(state[LEFT].view(np.int32)[0])
    key = state[KEY].view(np.uint64).astype(np.uint32)
    twister.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": MT_WORDS + 1 - left}}
    return twister


def _hand_back(generator: torch.Generator, state: np.ndarray, twister: np.random.MT19937) -> None:
    mt = twister.state["state"]
    position = int(mt["pos"])
    state = state.copy()
    state[LEFT] = np.frombuffer(np.int32(MT_WORDS + 1 - position).tobytes(), np.uint8)
    state[NEXT] = np.frombuffer(np.uint64(position).tobytes(), np.uint8)
    state[KEY] = np.frombuffer(mt["key"].astype(np.uint64).tobytes(), np.uint8)
    generator.set_state(torch.from_numpy(state))


def exponential(generator: torch.Generator, count: int) -> torch.Tensor:
    """`torch.empty(count).exponential_(1, generator=generator)`, computed with numpy."""
    state = generator.get_state().numpy()
    twister = _numpy_twister(state)
    raw = twister.random_raw(2 * count).reshape(count, 2)
    bits = np.left_shift(raw[:, 0], SHIFT_32)
    bits |= raw[:, 1]
    bits &= MASK_53
    values = bits.astype(np.float64)
    values *= -(2.0**-53)  # -u, exactly
    np.log1p(values, out=values)
    out = np.empty(count, np.float32)
    np.negative(values, out=out, casting="unsafe")
    _hand_back(generator, state, twister)
    return torch.from_numpy(out)


@functools.cache
def reproduces_torch() -> bool:
    """Whether `exponential` gives torch's bits and leaves the generator where torch would, here."""
    try:
        ours, theirs = torch.Generator().manual_seed(20261127), torch.Generator().manual_seed(20261127)
        if ours.get_state().numel() != STATE_BYTES:
            return False
        for count in (3, MT_WORDS + 1, 4099):
            if not torch.equal(exponential(ours, count), torch.empty(count).exponential_(1, generator=theirs)):
                return False
        return torch.equal(ours.get_state(), theirs.get_state())
    except (ValueError, TypeError, KeyError):
        return False
