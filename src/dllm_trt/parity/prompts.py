"""The prompts and lengths parity generates from when the user gives none."""

from __future__ import annotations

import math

import torch


def default_max_new_tokens(canvas: int, window: int) -> int:
    """Enough canvases that the context passes the sliding window, at most three."""
    return canvas * min(3, max(2, math.ceil((window + canvas) / canvas)))


def default_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Two prompts of different lengths (the second left-padded), ids drawn past the special tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (7, 3)]
