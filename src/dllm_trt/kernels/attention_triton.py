"""Attention that never writes its scores to memory: the torch oracle and the Triton kernels.

For the layers TensorRT has no fused attention kernel for (DiffusionGemma's full layers: head size
512, 16 query heads over 2 key/value heads): their decomposed form writes B x Hq x T x S fp32 scores
and probabilities, tens of GB at long contexts. Letters:

    B    batch
    Hq   query heads, Hkv key/value heads (grouped-query: head h reads key/value head h // (Hq / Hkv))
    T    queries (a prompt pass, or the canvas of a denoise step)
    S    keys: the cache, then the T new positions (the graph concatenates them before the node)
    D    head dim (512 on the released full layers); BD = D rounded up to a power of two, at least 16

Semantics (the ``dllm_trt::DllmAttention`` node; opset-23 Attention as optimize.attention emits it)::

    out[b, h] = softmax(Q[b, h] K[b, g]^T * scale + bias[b, 0], axis=-1) V[b, g]     g = h // (Hq / Hkv)

The additive bias [B, 1, T, S] is the mask the graph carries: causal in an encoder pass, bidirectional
over cache and canvas in a denoise step, the cache's validity and the prompt's padding; its masked
entries are the dtype's lowest finite value, so a query with no valid key (left padding) averages V
over every key, as transformers' eager attention does, instead of producing NaN.

``attention_reference`` is the readable torch oracle (fp32 throughout). The kernels run the plan of
kernels.attention_launches; each program keeps BM queries of one head in registers and streams the
keys and values of its range in BN-key tiles, with an online softmax (running maximum and sum, fp32):
no [T, S] tensor ever exists. The bias is read tile by tile beside K and V.

Numerics: Q K^T and P V accumulate in fp32 (IEEE for fp32 inputs); P is rounded to the inputs' dtype as
the operand of the P V dot (bf16/fp16 tensor cores), as flash attention does. Under
``TRITON_INTERPRET=1`` bf16/fp16 dot operands are upcast to fp32 after that rounding, because the
interpreter's bf16 ``tl.dot`` is wrong (kernels.moe_triton): the interpreter then computes what the GPU
does, up to summation order.
"""

from __future__ import annotations

import os

import torch

from dllm_trt.kernels.attention_launches import AttentionShape, grids, kernel_specs, splits

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below exist only with Triton; attention_reference works without it
    triton = None
    tl = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) V with grouped-query heads, in fp32; cast to Q's dtype.

    query [B, Hq, T, D], key/value [B, Hkv, S, D], bias [B, 1, T, S] -> [B, Hq, T, D]."""
    groups = query.shape[1] // key.shape[1]
    keys = key.float().repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    values = value.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), keys.transpose(2, 3)) * scale + bias.float()  # [B, Hq, T, S]
    return torch.matmul(torch.softmax(scores, dim=-1), values).to(query.dtype)


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, UPCAST: tl.constexpr):
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _attend_kernel(
        q_ptr,  # [B, Hq, T, D]
        k_ptr,  # [B, Hkv, S, D]
        v_ptr,  # [B, Hkv, S, D]
        bias_ptr,  # [B, 1, T, S] additive
        out_ptr,  # [B, Hq, T, D] (SPLIT False; else constexpr None)
        acc_ptr,  # [splits, B*Hq, T, D] fp32 (SPLIT True; else constexpr None)
        ml_ptr,  # [splits, B*Hq, T, 2] fp32 (SPLIT True; else constexpr None)
        queries,  # T
        keys,  # S
        keys_per_split,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        BD: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        SCALE: tl.constexpr,
        UPCAST: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        mb = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # b * HQ + h
        split = tl.program_id(2)
        b = bh // HQ
        kv = b * HKV + (bh % HQ) // (HQ // HKV)
        rows = mb * BM + tl.arange(0, BM)
        row_ok = rows < queries
        d = tl.arange(0, BD)
        d_ok = d < D
        q_off = (bh * queries + rows)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        kv_base = kv * keys * D
        bias_rows = (b * queries + rows).to(tl.int64) * keys  # [BM]
        start = split * keys_per_split
        stop = tl.minimum(start + keys_per_split, keys)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BD), tl.float32)
        n0 = start
        # a while loop over a runtime range (older Triton interpreters mishandle range() with tensor bounds)
        while n0 < stop:
            cols = n0 + tl.arange(0, BN)
            col_ok = cols < stop
            kv_off = kv_base + cols.to(tl.int64)[:, None] * D + d[None, :]
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
            scores = _dot(q, tl.trans(k), tl.zeros((BM, BN), tl.float32), UPCAST) * SCALE  # [BM, BN]
            bias = tl.load(bias_ptr + bias_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                           other=0.0)  # fmt: skip
            scores = tl.where(col_ok[None, :], scores + bias.to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every tile has a key in range
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
            m_i = m_new
            n0 += BN
        if SPLIT:
            part = split.to(tl.int64) * tl.num_programs(1) + bh  # [split, b*HQ + h]
            at = (part * queries + rows).to(tl.int64)
            tl.store(acc_ptr + at[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(ml_ptr + at * 2, m_i, mask=row_ok)
            tl.store(ml_ptr + at * 2 + 1, l_i, mask=row_ok)
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_kernel(
        acc_ptr,  # [splits, B*Hq, T, D] fp32
        ml_ptr,  # [splits, B*Hq, T, 2] fp32
        out_ptr,  # [B, Hq, T, D]
        queries,
        n_splits,
        D: tl.constexpr,
        BD: tl.constexpr,
        BM: tl.constexpr,
    ):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        bh = tl.program_id(1).to(tl.int64)
        heads = tl.num_programs(1)
        row_ok = rows < queries
        d = tl.arange(0, BD)
        mask = row_ok[:, None] & (d < D)[None, :]
        m = tl.full((BM,), float("-inf"), tl.float32)
        s = 0
        while s < n_splits:  # the overall maximum
            at = ((s * heads + bh) * queries + rows).to(tl.int64)
            m = tl.maximum(m, tl.load(ml_ptr + at * 2, mask=row_ok, other=0.0))
            s += 1
        total = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BD), tl.float32)
        s = 0
        while s < n_splits:
            at = ((s * heads + bh) * queries + rows).to(tl.int64)
            weight = tl.exp(tl.load(ml_ptr + at * 2, mask=row_ok, other=0.0) - m)
            total += weight * tl.load(ml_ptr + at * 2 + 1, mask=row_ok, other=0.0)
            acc += weight[:, None] * tl.load(acc_ptr + at[:, None] * D + d[None, :], mask=mask, other=0.0)
            s += 1
        out = acc / tl.where(row_ok, total, 1.0)[:, None]  # rows past T hold nothing
        out_at = (bh * queries + rows).to(tl.int64)[:, None] * D + d[None, :]
        tl.store(out_ptr + out_at, out.to(out_ptr.dtype.element_ty), mask=mask)


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def attention_shape(query: torch.Tensor, key: torch.Tensor, scale: float = 1.0) -> AttentionShape:
    return AttentionShape(_DTYPES[query.dtype], query.shape[1], key.shape[1], query.shape[3], scale)


def run_plan(
    shape: AttentionShape, buffers: dict[str, torch.Tensor], batch: int, queries: int, keys: int
) -> dict[str, torch.Tensor]:
    """Run the plan (kernels.attention_launches) through Triton's JIT. `buffers` holds q, k, v, bias and out
    by name; the split results are allocated here when the keys are split (and returned with them)."""
    specs = kernel_specs(shape, upcast=_interpreting())
    count, per_split = splits(shape, batch, queries, keys)
    grid = grids(shape, batch, queries, keys)
    device = buffers["q"].device
    values = dict(buffers, queries=queries, keys=keys, keys_per_split=per_split, n_splits=count)
    stages = ("attend",)
    if count > 1:
        rows = count * batch * shape.q_heads * queries
        values["acc"] = torch.empty(rows, shape.head_dim, dtype=torch.float32, device=device)
        values["ml"] = torch.empty(rows, 2, dtype=torch.float32, device=device)
        stages = ("attend_split", "combine")
    for stage in stages:
        spec = specs[stage]
        kernel = globals()[spec.kernel]
        arguments = {param: values[arg] for (param, _), arg in zip(spec.signature, spec.args, strict=True)}
        kernel[grid[stage]](**arguments, **spec.constants(), num_warps=spec.num_warps, num_stages=spec.num_stages)
    return values


def flash_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``DllmAttention`` through the Triton kernels: query [B, Hq, T, D], key/value [B, Hkv, S, D], bias
    [B, 1, T, S] (all one dtype) -> [B, Hq, T, D]. On CUDA tensors, or on CPU under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError("flash_attention needs Triton: pip install 'dllm-trt[triton]'")
    if not query.is_cuda and not _interpreting():
        raise RuntimeError("flash_attention runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1")
    batch, _, queries, head_dim = query.shape
    keys = key.shape[2]
    expected = {"key": (key, (batch, key.shape[1], keys, head_dim)), "value": (value, tuple(key.shape)),
                "bias": (bias, (batch, 1, queries, keys))}  # fmt: skip
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype != query.dtype:
            raise ValueError(f"{name} is {tensor.dtype}; Q, K, V and the bias share one dtype ({query.dtype})")
    shape = attention_shape(query, key, scale)
    out = torch.empty_like(query)
    if out.numel() == 0:
        return out
    buffers = dict(q=query.contiguous(), k=key.contiguous(), v=value.contiguous(), bias=bias.contiguous(), out=out)
    run_plan(shape, buffers, batch, queries, keys)
    return out
