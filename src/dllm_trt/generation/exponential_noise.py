"""torch's CPU `Tensor.exponential_(1, generator=g)`, the same bits from the same stream, with numpy.

The loop draws B*C*V Exp(1) values per denoise step (the noise inside `torch.multinomial`); on the
CPU torch makes them one at a time, about half a small model's denoise step, and numpy makes them
from the same Mersenne Twister in about half torch's time (README, "Measurements behind the passes"):

* torch's CPU generator is MT19937; `get_state()` holds its 624 words (stored as uint64) and
  `left` (outputs before the next twist), which numpy's `MT19937` takes as `key` and
  `pos = 625 - left`;
* each value takes two 32-bit outputs (hi, lo) as a 53-bit uniform u = ((hi << 32 | lo) & (2^53-1))
  * 2^-53 in float64, turned into -log1p(-u) in float64 and rounded to float32;
* the generator is handed back advanced by exactly the outputs used.

That is a reading of torch's implementation, so it is checked against torch itself once per
process (`reproduces_torch`); where it does not match (another torch, another generator layout)
the loop keeps torch's own draw. tests/generation/test_exponential_noise.py checks it bit for bit.
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

MT_WORDS = 624
STATE_BYTES = 5056  # CPUGeneratorImplState: seed, left, seeded, next, 624 words, normal cache
LEFT, NEXT, KEY = slice(8, 12), slice(16, 24), slice(24, 24 + MT_WORDS * 8)
HIGH_21 = np.uint32((1 << 21) - 1)  # the high word's share of the 53-bit uniform


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


class _Workspace(threading.local):
    """Scratch arrays kept between draws: fresh multi-MB arrays cost page faults on every step."""

    def __init__(self) -> None:
        self.high, self.values, self.low = np.empty(0, np.uint32), np.empty(0), np.empty(0)

    def arrays(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.values.size != count:
            self.high, self.values, self.low = np.empty(count, np.uint32), np.empty(count), np.empty(count)
        return self.high, self.values, self.low


_WORKSPACE = _Workspace()


def exponential(generator: torch.Generator, count: int) -> torch.Tensor:
    """`torch.empty(count).exponential_(1, generator=generator)`, computed with numpy."""
    state = generator.get_state().numpy()
    twister = _numpy_twister(state)
    words = np.random.Generator(twister).integers(0, 1 << 32, size=(count, 2), dtype=np.uint32)  # (hi, lo)
    high, values, low = _WORKSPACE.arrays(count)
    # -u = -(hi & (2^21-1)) * 2^-21 - lo * 2^-53: two exact float64 terms with disjoint bits, so
    # their sum is the 53-bit value exactly, without 64-bit shifts over a strided copy.
    np.bitwise_and(words[:, 0], HIGH_21, out=high)
    np.multiply(high, -(2.0**-21), out=values)
    np.multiply(words[:, 1], -(2.0**-53), out=low)
    values += low
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
