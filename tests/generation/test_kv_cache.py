import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from dllm_trt.generation.kv_cache import StaticKVCache
from dllm_trt.models.diffusion_gemma import LayerSpec

SPECS = [LayerSpec(0, True, 4, 2, False), LayerSpec(1, False, 8, 1, True)]


def chunk(tokens, start):
    values = torch.arange(start, start + tokens, dtype=torch.float32)
    return [values.view(1, 1, -1, 1).expand(2, spec.num_kv_heads, tokens, spec.head_dim).clone()
            for spec in SPECS for _ in (0, 1)]  # fmt: skip


def test_sliding_layers_keep_what_transformers_keeps():
    window = 6
    cache = StaticKVCache(SPECS, batch=2, max_length=40, window=window, dtype=torch.float32)
    reference = DynamicSlidingWindowLayer(sliding_window=window)
    start = 0
    for tokens in (3, 4, 8, 1, 5):
        new = chunk(tokens, start)
        cache.append(new, torch.ones(2, tokens, dtype=torch.bool))
        reference.update(new[0], new[1])
        start += tokens
        key, value, full_key, full_value = cache.tensors()
        assert torch.equal(key, reference.keys) and torch.equal(value, reference.values)
        assert all(t.is_contiguous() for t in cache.tensors())  # bindable by address
        expected_full = torch.arange(start, dtype=torch.float32).view(1, 1, -1, 1).expand_as(full_value)
        assert torch.equal(full_value, expected_full)
        assert full_key.shape[2] == start  # full layers keep everything
        assert cache.mask().shape == (2, start)
    # memory of sliding layers is bounded by the window, whatever the context
    assert cache.storage[0].numel() == 2 * 2 * (window - 1) * 4


def test_overflow_is_refused():
    cache = StaticKVCache(SPECS, batch=2, max_length=5, window=4, dtype=torch.float32)
    cache.append(chunk(5, 0), torch.ones(2, 5, dtype=torch.bool))
    try:
        cache.append(chunk(1, 5), torch.ones(2, 1, dtype=torch.bool))
    except ValueError as exc:
        assert "KV cache full" in str(exc)
    else:
        raise AssertionError("overflow accepted")


def test_aligned_cache_holds_what_the_static_cache_holds_right_aligned():
    """The fixed layout the scheduler batches: the same positions as StaticKVCache, newest in the last slot,
    padding (invalid) on the left, slot counts fixed whatever the length."""
    from dllm_trt.generation.kv_cache import AlignedKVCache

    window, slots = 6, 20
    aligned = AlignedKVCache(SPECS, max_length=slots, window=window, dtype=torch.float32)
    static = StaticKVCache(SPECS, batch=1, max_length=slots, window=window, dtype=torch.float32)
    start = 0
    for tokens in (3, 4, 8, 1):
        new = [t[:1] for t in chunk(tokens, start)]
        aligned.append(new)
        static.append(new, torch.ones(1, tokens, dtype=torch.bool))
        start += tokens
        for ours, theirs in zip(aligned.tensors(), static.tensors()):
            held = theirs.shape[2]
            assert torch.equal(ours[:, :, ours.shape[2] - held :], theirs)
            assert not ours[:, :, : ours.shape[2] - held].any()  # nothing but zeros before the held positions
        assert [t.shape[2] for t in aligned.tensors()] == [window - 1, window - 1, slots, slots]
        assert aligned.mask().shape == (1, slots) and aligned.mask().sum() == start
        assert aligned.mask()[0, slots - start :].all()
    try:
        aligned.append([t[:1] for t in chunk(5, start)])
    except ValueError as exc:
        assert "KV cache full" in str(exc)
    else:
        raise AssertionError("overflow accepted")
