"""The attention kernels under TRITON_INTERPRET=1 against transformers' own eager attention.

The masks are the step graph's own (models.diffusion_gemma.attention_bias): causal over cache and
new tokens (an encoder pass), bidirectional over cache and canvas (a denoise step), invalid cache
positions and left padding (rows with no valid key among them). fp32: max relative error 1e-5 of the
largest output. bf16: within 2x the error of transformers' eager attention run in bf16 (its envelope),
both measured against the fp32 reference on the same bf16 inputs.
"""

import importlib
import os
from types import SimpleNamespace

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import eager_attention_forward  # noqa: E402

from dllm_trt.kernels import attention_launches  # noqa: E402
from dllm_trt.models.diffusion_gemma import attention_bias  # noqa: E402

at = importlib.reload(importlib.import_module("dllm_trt.kernels.attention_triton"))


def eager(query, key, value, bias, scale=1.0):
    """transformers' eager attention, as DiffusionGemma's layers call it, back in [B, Hq, T, D]."""
    module = SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], training=False)
    out, _ = eager_attention_forward(module, query, key, value, bias, scaling=scale)
    return out.transpose(1, 2)


def inputs(batch, q_heads, kv_heads, queries, cached, head_dim, causal, padded=0, dtype=torch.float32, seed=0):
    """Q/K/V of `queries` new tokens over `cached` positions and the graph's bias for them; `padded` left-pads
    the last row by that many of the new tokens (its first queries then see no valid key)."""
    gen = torch.Generator().manual_seed(seed)
    keys = cached + queries
    query = torch.randn(batch, q_heads, queries, head_dim, generator=gen)
    key = torch.randn(batch, kv_heads, keys, head_dim, generator=gen)
    value = torch.randn(batch, kv_heads, keys, head_dim, generator=gen)
    valid = torch.ones(batch, keys, dtype=torch.bool)
    if padded:
        valid[-1, : cached + padded] = False  # an empty cache row and the padding of its prompt
    bias = attention_bias(valid, queries, causal, None, dtype).expand(batch, 1, queries, keys).contiguous()
    return query.to(dtype), key.to(dtype), value.to(dtype), bias


def relative_error(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


CASES = {
    # name: (batch, q heads, kv heads, queries, cached, head dim, causal, padded); over 32 keys (two key tiles)
    "causal encoder pass over a cache": (2, 4, 2, 13, 21, 16, True, 0),
    "bidirectional denoise step": (2, 4, 2, 8, 30, 16, False, 0),
    "causal, left-padded row (queries with no valid key)": (2, 4, 2, 40, 0, 32, True, 12),
    "bidirectional, a row with invalid cache": (2, 2, 1, 8, 30, 32, False, 3),
    "GQA 8:1, odd head dim": (1, 8, 1, 5, 40, 24, True, 0),
    "multi-head (no grouping)": (1, 3, 3, 6, 40, 16, False, 0),
}


# every case with its keys split across programs (as the canvas over a cache runs), two also in one pass
SPLITS = [(case, True) for case in CASES] + [(case, False) for case in list(CASES)[:3:2]]


@pytest.mark.parametrize("case, split", SPLITS, ids=[f"{c}, {'keys split' if s else 'one pass'}" for c, s in SPLITS])
def test_fp32_matches_eager_attention(case, split, monkeypatch):
    if not split:  # as many query programs as a GPU needs: no split, out written by the attend kernel
        monkeypatch.setattr(attention_launches, "TARGET_PROGRAMS", 1)
    query, key, value, bias = inputs(*CASES[case])
    shape = at.attention_shape(query, key)
    count, _ = attention_launches.splits(shape, query.shape[0], query.shape[2], key.shape[2])
    assert (count > 1) == split, "the case lost its point"
    out = at.flash_attention(query, key, value, bias)
    ref = eager(query, key, value, bias)
    err = relative_error(out, ref)
    print(f"\n[{case}, {count} split(s)] fp32 max rel err {err:.2e}")
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert err <= 1e-5
    assert torch.isfinite(out).all()


def test_head_512_with_the_released_grouping():
    """The released full layers: 16 query heads over 2 key/value heads of 512, a canvas over a cache."""
    query, key, value, bias = inputs(1, 16, 2, 4, 36, 512, False, seed=1)
    out = at.flash_attention(query, key, value, bias)
    err = relative_error(out, eager(query, key, value, bias))
    print(f"\n[head 512, GQA 16:2] fp32 max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("case", ["causal encoder pass over a cache", "bidirectional, a row with invalid cache"])
def test_bf16_is_within_the_envelope_of_eager_bf16(case):
    query, key, value, bias = inputs(*CASES[case], dtype=torch.bfloat16, seed=2)
    ref = eager(query.float(), key.float(), value.float(), bias.float())  # fp32 on the same bf16 values
    envelope = relative_error(eager(query, key, value, bias), ref)
    out = at.flash_attention(query, key, value, bias)
    err = relative_error(out, ref)
    print(f"\n[{case}] bf16 max rel err {err:.2e}, transformers in bf16 {envelope:.2e}")
    assert out.dtype == torch.bfloat16
    assert err <= 2 * envelope


def test_a_fully_masked_query_averages_the_values_as_eager_does():
    # no NaN, and the same finite value transformers' eager attention gives a padding query
    query, key, value, bias = inputs(1, 2, 1, 4, 0, 16, True, padded=2)
    out = at.flash_attention(query, key, value, bias)
    ref = eager(query, key, value, bias)
    torch.testing.assert_close(out[0, :, :2], ref[0, :, :2], atol=1e-6, rtol=1e-5)
    average = value[0].mean(dim=1, keepdim=True).expand(2, 2, -1)  # one key/value head for both query heads
    torch.testing.assert_close(out[0, :, :2], average, atol=1e-6, rtol=0)


def test_refuses_mismatched_inputs():
    query, key, value, bias = inputs(1, 2, 1, 4, 3, 16, True)
    with pytest.raises(ValueError, match="bias has shape"):
        at.flash_attention(query, key, value, bias[:, :, :2])
    with pytest.raises(ValueError, match="share one dtype"):
        at.flash_attention(query, key, value.to(torch.bfloat16), bias)


def test_the_workspace_bound_holds_for_every_split():
    shape = attention_launches.AttentionShape("bf16", 16, 2, 512)
    bound = attention_launches.workspace_bytes(shape)
    for batch in (1, 2, 3, 8):
        for queries in (1, 7, 64, 256, 4096):
            for keys in (queries, queries + 100, queries + 262144):
                count, per_split = attention_launches.splits(shape, batch, queries, keys)
                assert 1 <= count <= attention_launches.MAX_SPLITS and (count - 1) * per_split < keys
                assert attention_launches.workspace_layout(shape, batch, queries, keys)[1] <= bound
    assert bound < 20e6  # about 17 MB at head 512, whatever the context
