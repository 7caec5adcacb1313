"""The one chunk rule of the loop and the memory plan: passes, protected spans, the chunk a run uses."""

import pytest

from dllm_trt.errors import DllmError
from dllm_trt.generation.prompt_chunks import (
    DEFAULT_PROMPT_CHUNK,
    chunk_spans,
    largest_passes,
    resolve_prompt_chunk,
)


def test_passes_cover_the_prompt_in_order_at_most_chunk_each():
    assert chunk_spans(35, 8) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 35)]
    assert chunk_spans(35, 35) == chunk_spans(35, 100) == [(0, 35)]
    assert chunk_spans(0, 4) == []
    for length, chunk in ((1, 1), (17, 3), (4096, 256)):
        spans = chunk_spans(length, chunk)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(end - start for start, end in spans) == min(chunk, length)


def test_a_protected_span_is_never_split():
    # a span straddling a boundary ends the pass before it
    assert chunk_spans(20, 8, [(6, 10)]) == [(0, 6), (6, 14), (14, 20)]
    # a span longer than a chunk gets a pass of its own, as long as the span
    assert chunk_spans(30, 8, [(8, 21)]) == [(0, 8), (8, 21), (21, 29), (29, 30)]
    # a span starting a pass and longer than it, right after another span
    assert chunk_spans(24, 4, [(2, 4), (4, 11)]) == [(0, 4), (4, 11), (11, 15), (15, 19), (19, 23), (23, 24)]
    # spans that fit inside passes change nothing
    assert chunk_spans(16, 8, [(1, 3), (9, 16)]) == chunk_spans(16, 8)
    for spans in ([(6, 10)], [(8, 21)], [(2, 4), (4, 11)], [(0, 5), (7, 30)]):
        for chunk in (1, 2, 3, 5, 8):
            passes = chunk_spans(30, chunk, spans)
            for a, b in spans:
                assert any(start <= a and b <= end for start, end in passes), (spans, chunk, passes)


def test_overlapping_spans_are_kept_whole_together():
    """Images of two batch rows over the same columns: no pass may cut either, so their union stays whole."""
    passes = chunk_spans(30, 4, [(5, 9), (8, 12)])
    assert (5, 12) in passes and passes[0] == (0, 4) and passes[-1] == (28, 30), passes
    assert not any(5 < boundary < 12 for start, end in passes for boundary in (start, end)), passes


@pytest.mark.parametrize("spans", [[(3, 3)], [(28, 31)], [(-1, 2)]])
def test_bad_spans_are_refused(spans):
    with pytest.raises(ValueError):
        chunk_spans(30, 4, spans)


def test_largest_passes_is_what_a_memory_bound_needs():
    assert largest_passes(35, 8) == {8: 24, 3: 32}
    assert largest_passes(262144, 4096) == {4096: 262144 - 4096}
    assert largest_passes(30, 8, [(8, 21)]) == {8: 21, 13: 8, 1: 29}


def test_the_chunk_a_run_uses():
    assert resolve_prompt_chunk(None, None) == DEFAULT_PROMPT_CHUNK
    assert resolve_prompt_chunk(None, 2048) == 2048  # an engine's new_tokens maximum
    assert resolve_prompt_chunk(256, 2048) == 256
    with pytest.raises(DllmError, match="at most 2048 new tokens per pass"):
        resolve_prompt_chunk(4096, 2048)
    with pytest.raises(DllmError, match="at least one token"):
        resolve_prompt_chunk(0, None)
