"""Fused MoE experts for DiffusionGemma: the torch oracle and two Triton implementations.

Shape letters used in every comment below:

    N    tokens (rows of ``hidden``; 256 canvas tokens per sequence in a denoise step)
    H    hidden size (2816)
    E    experts (128);  E_P = E rounded up to a power of two (Triton tile widths)
    K    active experts per token, ``top_k`` (8)
    I    expert width, ``moe_intermediate_size`` (704)
    A    assignments = N * K; assignment ``a = n * K + k`` is token n's k-th expert

Semantics (the ``dllm_trt::DllmMoE`` node; the order of the reference's
``DiffusionGemmaTextRouter`` after ``proj`` and ``DiffusionGemmaTextExperts``)::

    probs      = softmax(router_logits)            fp32            [N, E]
    p, idx     = topk(probs, K)                                    [N, K]
    w          = p / p.sum(-1) * per_expert_scale[idx]             [N, K]
    [gate; up] = gate_up_proj[idx] @ hidden[n]                     [2I]
    out[n]     = sum_k w[n, k] * down_proj[idx] @ (gelu_tanh(gate) * up)
    accumulate in fp32, cast to hidden.dtype at the end

``moe_reference`` is the readable torch oracle. ``fused_moe`` is the fast path: the five launches
of kernels.moe_launches (route, bucket, expert up, expert down, combine), each a pure function of
its inputs, run through Triton's JIT; the TensorRT plugin runs the same plan from PTX.

    up    grid (cdiv(N, BM), cdiv(I, BI), E), m-block fastest: programs of one expert run next to
          each other, so gate_up_proj[e] leaves HBM once per step; programs past count[e] exit.
    down  grid (cdiv(N, BM), cdiv(H, BH), E); down_proj[e] read once likewise.

Why five and not fewer: the reduction over experts needs every expert's result for a token, so a
kernel that reads each expert's weights once (expert-major) cannot also own output rows
(token-major) without atomics into a zeroed fp32 buffer. Fusing the up and down GEMMs in one
program would need a [BM, H] fp32 accumulator or re-reading gate_up per H slice. Bucketing needs
every token's routing (a grid-wide dependency), hence its own launch. Scratch traffic is small next
to the weights: act is A*I*4 B and part A*H*4 B (5.8 and 23 MB at N=256 and the released sizes)
against 1.52 GB of bf16 expert weights. Timings: bench/bench_moe_kernel.py.

Numerics:
* Expert selection compares the fp32 logits, not the probabilities: softmax is monotone, so
  the order is the same, and comparing inputs makes the choice independent of the exp
  implementation (torch CPU, CUDA and Triton differ in the last ulp). Exact ties go to the
  lowest expert index. torch.topk's tie order is unspecified: on CPU it comes from an
  introselect and picks e.g. [84, 87, 86, ...] of 128 equal values; on CUDA (torch 2.11) it
  picked the lowest indices in scrambled order ([7, 6, 4, 5, 1, 0, 2, 3]), the same set as
  ours. No kernel can match CPU torch on exact ties that straddle the top-k boundary; the
  tests check our rule there and that torch's pick has the same probabilities.
* Weights follow the reference order: p = exp(x - max) / sum, w = p / sum_topk(p) * scale.
* GEMMs accumulate in fp32. act is stored fp32 and rounded to T only as the operand of the
  down GEMM's tensor-core dot (bf16/fp16); fp32 inputs use IEEE fp32 dots, never TF32.
* Under ``TRITON_INTERPRET=1`` (how the CPU tests run) bf16/fp16 dot operands are upcast to
  fp32, because the interpreter's bf16 ``tl.dot`` returns garbage (Triton 3.9).

Quantized experts (``weight_format`` fp8 / nvfp4; inputs and formulas in contract.MOE_INPUTS and
kernels.quantization) are dequantized inside the up and down kernels, never in memory:
* fp8: the e4m3 values are loaded as such and converted to the activations' dtype for the dot
  (exact: e4m3 fits bf16 and fp16); the fp32 scale of each output channel multiplies the fp32
  accumulator after the reduction (the same products as dequantize-then-dot, summed in another order).
* nvfp4: each byte holds two e2m1 codes (the even element in the low nibble); a code is decoded
  by its bits (sign, 2 exponent bits with bias 1, 1 mantissa bit) and multiplied by its block's
  e4m3 scale: exact in bf16 and fp16 (2 x 4 significant bits); the expert's fp32 global scale
  multiplies the accumulator after the reduction.
So the tensor-core dot sees exactly the dequantized weights up to a factor applied in fp32, natively
on every GPU the kernels compile for (SM90 included: no FP4 instruction is needed).
``moe_reference`` takes float weights: dequantize first (kernels.quantization.dequantize_experts).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dllm_trt.contract import MOE_INPUTS
from dllm_trt.kernels.moe_launches import STAGES, MoEShape, grids, intermediates, kernel_specs, tile_m
from dllm_trt.kernels.quantization import FP4, FP8, pack_fp4, quantize_fp8, quantize_nvfp4

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below exist only with Triton; moe_reference works without it
    triton = None
    tl = None


def triton_available() -> bool:
    """True when Triton imports, i.e. ``fused_moe`` can run (on CUDA, or on CPU when interpreting)."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def route_reference(
    router_logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference router after ``proj``: returns (topk_ids [N, K] int64, weights [N, K] fp32)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
    topk_p, topk_ids = torch.topk(probs, k=top_k, dim=-1)  # [N, K]
    weights = topk_p / topk_p.sum(dim=-1, keepdim=True)
    weights = weights * per_expert_scale.float()[topk_ids]
    return topk_ids, weights


def moe_reference(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Plain-torch ``DllmMoE``: fp32 throughout, one expert at a time, cast to ``hidden.dtype``."""
    n_tokens, _ = hidden.shape
    width = down_proj.shape[-1]  # I
    topk_ids, weights = route_reference(router_logits, per_expert_scale, top_k)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # [N, H]
    for expert in range(gate_up_proj.shape[0]):
        rows, slots = torch.where(topk_ids == expert)  # tokens that picked this expert
        if rows.numel() == 0:
            continue
        x = hidden[rows].float()  # [n_e, H]
        gate_up = x @ gate_up_proj[expert].float().T  # [n_e, 2I]
        gate, up = gate_up[:, :width], gate_up[:, width:]
        act = torch.nn.functional.gelu(gate, approximate="tanh") * up  # [n_e, I]
        y = act @ down_proj[expert].float().T  # [n_e, H]
        out.index_add_(0, rows, y * weights[rows, slots, None])
    assert out.shape[0] == n_tokens
    return out.to(hidden.dtype)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

if triton is not None:
    SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # jit code reads only constexpr globals

    @triton.jit
    def _gelu_tanh(x):
        # 0.5*x*(1+tanh(u)) == x*sigmoid(2u): one exp, no tanh (absent from the stable tl API),
        # and it saturates cleanly to 0 / x for large |x|.
        u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return x / (1.0 + tl.exp(-2.0 * u))

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr):
        # UPCAST: fp32 operands (IEEE, not TF32), or bf16/fp16 under the interpreter (see docstring).
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _as_act(x, ACT: tl.constexpr):
        # the dot operands' dtype (moe_launches._ACT): the activations' own
        if ACT == 2:
            return x.to(tl.bfloat16)
        elif ACT == 1:
            return x.to(tl.float16)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _e2m1(code):
        """float4e2m1 codes (int32, 0..15) -> fp32: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0."""
        mag = code & 7
        exponent = mag >> 1
        mantissa = (mag & 1).to(tl.float32)
        power = tl.where(exponent == 3, 4.0, tl.where(exponent == 2, 2.0, 1.0))
        value = tl.where(exponent == 0, 0.5 * mantissa, (1.0 + 0.5 * mantissa) * power)
        return tl.where((code & 8) != 0, -value, value)

    @triton.jit
    def _weight_tile(w_ptr, block_scale_ptr, rows, r_ok, k_offs, k_ok, K: tl.constexpr, WFMT: tl.constexpr):
        """Rows ``rows`` (absolute: expert * R + r) x columns ``k_offs`` of an [E, R, K] weight, loaded as a
        [BK, BR] tile so the dot needs no transpose. WFMT 0: as stored; 1: the e4m3 values in fp32;
        2: the e2m1 values times their block's e4m3 scale, in fp32. Channel and global scales are the
        caller's, applied to the accumulator."""
        mask = k_ok[:, None] & r_ok[None, :]
        if WFMT == 2:
            packed = tl.load(w_ptr + rows[None, :] * (K // 2) + (k_offs // 2)[:, None], mask=mask, other=0)
            code = (packed.to(tl.int32) >> ((k_offs % 2) * 4)[:, None]) & 15
            scale_ptrs = block_scale_ptr + rows[None, :] * (K // 16) + (k_offs // 16)[:, None]
            return _e2m1(code) * tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptr + rows[None, :] * K + k_offs[:, None], mask=mask, other=0.0)
            if WFMT == 1:
                w = w.to(tl.float32)
            return w

    @triton.jit
    def _route_tile(logits_ptr, rows, n_tokens, E: tl.constexpr, E_P: tl.constexpr, TOP_K: tl.constexpr):
        """Route BT tokens: returns (rank [BT, E_P] int32: k if picked else -1, probs, topk_sum [BT])."""
        cols = tl.arange(0, E_P)
        row_ok = rows < n_tokens
        col_ok = cols < E
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :]
        # padded rows read 0.0 (finite: no NaN from an all -inf row); padded experts are -inf.
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        x = tl.where(col_ok[None, :], x, float("-inf"))  # [BT, E_P]
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        probs = ex / tl.sum(ex, axis=1)[:, None]  # [BT, E_P]
        rank = tl.full(x.shape, -1, tl.int32)
        work = x
        for k in tl.static_range(TOP_K):
            best = tl.max(work, axis=1)  # [BT]
            # lowest expert index among exact ties
            pick = tl.min(tl.where(work == best[:, None], cols[None, :], E_P), axis=1)  # [BT]
            hit = cols[None, :] == pick[:, None]
            rank = tl.where(hit, k, rank)
            work = tl.where(hit, float("-inf"), work)
        topk_sum = tl.sum(tl.where(rank >= 0, probs, 0.0), axis=1)  # [BT]
        return rank, probs, topk_sum

    @triton.jit
    def _geglu_tile(
        hidden_ptr, tok, row_ok, e, gate_up_ptr, block_scale_ptr, scale_ptr, global_ptr, i_offs, i_ok,
        H: tl.constexpr, I: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,  # noqa: E741
        UPCAST: tl.constexpr, WFMT: tl.constexpr,
    ):  # fmt: skip
        """act [BM, BI] = gelu_tanh(x @ Wg^T) * (x @ Wu^T) for token rows ``tok``, width slice ``i_offs``."""
        acc_g = tl.zeros((BM, BI), dtype=tl.float32)
        acc_u = tl.zeros((BM, BI), dtype=tl.float32)
        gate_rows = e.to(tl.int64) * (2 * I) + i_offs  # gate rows 0..I-1, up rows I..2I-1 of expert e
        for k0 in range(0, H, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_ok = k_offs < H
            x_mask = row_ok[:, None] & k_ok[None, :]
            x = tl.load(hidden_ptr + tok[:, None] * H + k_offs[None, :], mask=x_mask, other=0.0)  # [BM, BK]
            wg = _weight_tile(gate_up_ptr, block_scale_ptr, gate_rows, i_ok, k_offs, k_ok, H, WFMT)
            wu = _weight_tile(gate_up_ptr, block_scale_ptr, gate_rows + I, i_ok, k_offs, k_ok, H, WFMT)
            acc_g = _mma(x, wg.to(x.dtype), acc_g, UPCAST)
            acc_u = _mma(x, wu.to(x.dtype), acc_u, UPCAST)
        if WFMT == 1:  # fp8: the scale of each output channel
            channel = scale_ptr + e.to(tl.int64) * (2 * I) + i_offs
            acc_g = acc_g * tl.load(channel, mask=i_ok, other=0.0)[None, :]
            acc_u = acc_u * tl.load(channel + I, mask=i_ok, other=0.0)[None, :]
        if WFMT == 2:  # nvfp4: the expert's global scale
            glob = tl.load(global_ptr + e)
            acc_g = acc_g * glob
            acc_u = acc_u * glob
        return _gelu_tanh(acc_g) * acc_u

    @triton.jit
    def _down_tile(
        act, down_ptr, block_scale_ptr, rows, h_ok, k_offs, k_ok, acc,
        I: tl.constexpr, UPCAST: tl.constexpr, WFMT: tl.constexpr, ACT: tl.constexpr,  # noqa: E741
    ):  # fmt: skip
        """acc [BM, BH] += act [BM, BK] @ down[rows, k_offs]^T (rows = e * H + h), unscaled."""
        wd = _weight_tile(down_ptr, block_scale_ptr, rows, h_ok, k_offs, k_ok, I, WFMT)
        return _mma(_as_act(act, ACT), _as_act(wd, ACT), acc, UPCAST)

    @triton.jit
    def _route_kernel(
        router_logits_ptr,  # [N, E] fp32
        per_expert_scale_ptr,  # [E] fp32
        n_tokens,
        topk_ids_ptr,  # [A] int32 out
        topk_w_ptr,  # [A] fp32 out
        E: tl.constexpr,
        E_P: tl.constexpr,
        TOP_K: tl.constexpr,
        BT: tl.constexpr,
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        row_ok = rows < n_tokens
        cols = tl.arange(0, E_P)
        rank, probs, topk_sum = _route_tile(router_logits_ptr, rows, n_tokens, E, E_P, TOP_K)
        for k in tl.static_range(TOP_K):
            picked = rank == k  # one column per row
            expert = tl.sum(tl.where(picked, cols[None, :], 0), axis=1)  # [BT]
            p_k = tl.sum(tl.where(picked, probs, 0.0), axis=1)
            scale = tl.load(per_expert_scale_ptr + expert, mask=row_ok, other=0.0).to(tl.float32)
            a = rows.to(tl.int64) * TOP_K + k  # assignment ids, k in descending order
            tl.store(topk_ids_ptr + a, expert, mask=row_ok)
            tl.store(topk_w_ptr + a, p_k / topk_sum * scale, mask=row_ok)

    @triton.jit
    def _bucket_kernel(
        topk_ids_ptr,  # [A] int32
        n_tokens,
        sorted_ptr,  # [E, N] int32 out: assignment ids per expert, in token order
        counts_ptr,  # [E] int32 out
        TOP_K: tl.constexpr,
        BA: tl.constexpr,
    ):
        e = tl.program_id(0)
        n_assign = n_tokens * TOP_K
        count = 0
        a0 = 0
        # a while loop, not range(n_assign): older Triton interpreters turn a runtime bound into a
        # 1-element array that NumPy 2 refuses to convert to a Python int
        while a0 < n_assign:
            a = a0 + tl.arange(0, BA)
            member = tl.load(topk_ids_ptr + a, mask=a < n_assign, other=-1) == e  # [BA]
            pos = count + tl.cumsum(member.to(tl.int32), axis=0) - 1
            tl.store(sorted_ptr + e * n_tokens + pos, a, mask=member)
            count += tl.sum(member.to(tl.int32), axis=0)
            a0 += BA
        tl.store(counts_ptr + e, count)

    @triton.jit
    def _expert_up_kernel(
        hidden_ptr,  # [N, H] T
        gate_up_proj_ptr,  # [E, 2I, H] T | float8e4m3fn | [E, 2I, H/2] uint8 (packed e2m1)
        gate_up_scale_ptr,  # fp8: [E, 2I] fp32; else constexpr None
        gate_up_block_scale_ptr,  # nvfp4: [E, 2I, H/16] float8e4m3fn; else constexpr None
        gate_up_global_scale_ptr,  # nvfp4: [E] fp32; else constexpr None
        sorted_ptr,  # [E, N] int32
        counts_ptr,  # [E] int32
        n_tokens,
        act_ptr,  # [A, I] fp32 out
        H: tl.constexpr,
        I: tl.constexpr,  # noqa: E741 (the shape letter)
        TOP_K: tl.constexpr,
        BM: tl.constexpr,
        BI: tl.constexpr,
        BK: tl.constexpr,
        UPCAST: tl.constexpr,
        WFMT: tl.constexpr,  # moe_launches.WFMT: 0 float, 1 fp8, 2 nvfp4
        ACT: tl.constexpr,  # unused here: the up dot runs in hidden's dtype
    ):
        mb = tl.program_id(0)
        ib = tl.program_id(1)
        e = tl.program_id(2)
        count = tl.load(counts_ptr + e)
        if mb * BM >= count:
            return
        slots = mb * BM + tl.arange(0, BM)
        slot_ok = slots < count
        a = tl.load(sorted_ptr + e * n_tokens + slots, mask=slot_ok, other=0).to(tl.int64)  # [BM]
        tok = a // TOP_K
        i_offs = ib * BI + tl.arange(0, BI)
        i_ok = i_offs < I
        act = _geglu_tile(
            hidden_ptr, tok, slot_ok, e, gate_up_proj_ptr, gate_up_block_scale_ptr, gate_up_scale_ptr,
            gate_up_global_scale_ptr, i_offs, i_ok, H, I, BM, BI, BK, UPCAST, WFMT,
        )  # [BM, BI]  # fmt: skip
        tl.store(act_ptr + a[:, None] * I + i_offs[None, :], act, mask=slot_ok[:, None] & i_ok[None, :])

    @triton.jit
    def _expert_down_kernel(
        act_ptr,  # [A, I] fp32
        down_proj_ptr,  # [E, H, I] T | float8e4m3fn | [E, H, I/2] uint8 (packed e2m1)
        down_scale_ptr,  # fp8: [E, H] fp32; else constexpr None
        down_block_scale_ptr,  # nvfp4: [E, H, I/16] float8e4m3fn; else constexpr None
        down_global_scale_ptr,  # nvfp4: [E] fp32; else constexpr None
        sorted_ptr,  # [E, N] int32
        counts_ptr,  # [E] int32
        topk_w_ptr,  # [A] fp32
        n_tokens,
        part_ptr,  # [A, H] fp32 out
        H: tl.constexpr,
        I: tl.constexpr,  # noqa: E741 (the shape letter)
        BM: tl.constexpr,
        BH: tl.constexpr,
        BK: tl.constexpr,
        UPCAST: tl.constexpr,
        WFMT: tl.constexpr,  # moe_launches.WFMT: 0 float, 1 fp8, 2 nvfp4
        ACT: tl.constexpr,  # the dot operands' dtype: the activations' (moe_launches._ACT)
    ):
        mb = tl.program_id(0)
        hb = tl.program_id(1)
        e = tl.program_id(2)
        count = tl.load(counts_ptr + e)
        if mb * BM >= count:
            return
        slots = mb * BM + tl.arange(0, BM)
        slot_ok = slots < count
        a = tl.load(sorted_ptr + e * n_tokens + slots, mask=slot_ok, other=0).to(tl.int64)  # [BM]
        h_offs = hb * BH + tl.arange(0, BH)
        h_ok = h_offs < H
        rows = e.to(tl.int64) * H + h_offs
        acc = tl.zeros((BM, BH), dtype=tl.float32)
        for k0 in range(0, I, BK):
            k_offs = k0 + tl.arange(0, BK)
            k_ok = k_offs < I
            act_mask = slot_ok[:, None] & k_ok[None, :]
            act = tl.load(act_ptr + a[:, None] * I + k_offs[None, :], mask=act_mask, other=0.0)  # [BM, BK]
            acc = _down_tile(act, down_proj_ptr, down_block_scale_ptr, rows, h_ok, k_offs, k_ok, acc, I, UPCAST, WFMT,
                             ACT)  # fmt: skip
        if WFMT == 1:  # fp8: the scale of each output channel
            acc = acc * tl.load(down_scale_ptr + rows, mask=h_ok, other=0.0)[None, :]
        if WFMT == 2:  # nvfp4: the expert's global scale
            acc = acc * tl.load(down_global_scale_ptr + e)
        w = tl.load(topk_w_ptr + a, mask=slot_ok, other=0.0)
        part_mask = slot_ok[:, None] & h_ok[None, :]
        tl.store(part_ptr + a[:, None] * H + h_offs[None, :], acc * w[:, None], mask=part_mask)

    @triton.jit
    def _combine_kernel(
        part_ptr,  # [A, H] fp32
        n_tokens,
        out_ptr,  # [N, H] T out
        H: tl.constexpr,
        TOP_K: tl.constexpr,
        BT: tl.constexpr,
        BH: tl.constexpr,
    ):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        h_offs = tl.program_id(1) * BH + tl.arange(0, BH)
        mask = (rows < n_tokens)[:, None] & (h_offs < H)[None, :]
        acc = tl.zeros((BT, BH), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            a = rows.to(tl.int64) * TOP_K + k
            acc += tl.load(part_ptr + a[:, None] * H + h_offs[None, :], mask=mask, other=0.0)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * H + h_offs[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _check_inputs(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    weight_format: str = "float",
    scales: tuple[torch.Tensor, ...] = (),
) -> tuple[int, int, int, int]:
    if triton is None:
        raise RuntimeError("fused_moe needs Triton: pip install 'dllm-trt[triton]'")
    if not hidden.is_cuda and not _interpreting():
        raise RuntimeError("fused_moe runs on CUDA tensors, or on CPU under TRITON_INTERPRET=1")
    if weight_format not in MOE_INPUTS:
        raise ValueError(f"unknown weight_format '{weight_format}'")
    if len(scales) != len(MOE_INPUTS[weight_format]) - 5:
        raise ValueError(f"weight_format {weight_format} takes {MOE_INPUTS[weight_format][5:]}, got {len(scales)}")
    n_tokens, hidden_size = hidden.shape
    n_experts, two_width, _ = gate_up_proj.shape
    width = two_width // 2
    pack = 2 if weight_format == "nvfp4" else 1  # two e2m1 codes a byte along the input axis
    expected = {
        "router_logits": (router_logits, (n_tokens, n_experts)),
        "per_expert_scale": (per_expert_scale, (n_experts,)),
        "gate_up_proj": (gate_up_proj, (n_experts, 2 * width, hidden_size // pack)),
        "down_proj": (down_proj, (n_experts, hidden_size, width // pack)),
    }
    block = 16
    scale_shapes = {
        "float": (),
        "fp8": ((n_experts, 2 * width), (n_experts, hidden_size)),
        "nvfp4": ((n_experts, 2 * width, hidden_size // block), (n_experts, hidden_size, width // block),
                  (n_experts,), (n_experts,)),
    }[weight_format]  # fmt: skip
    for name, tensor, shape in zip(MOE_INPUTS[weight_format][5:], scales, scale_shapes, strict=True):
        expected[name] = (tensor, shape)
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    stored = {"float": hidden.dtype, "fp8": torch.float8_e4m3fn, "nvfp4": torch.uint8}[weight_format]
    if gate_up_proj.dtype != stored or down_proj.dtype != stored:
        raise ValueError(f"{weight_format} expert weights are {stored} (hidden's dtype for float)")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {hidden.dtype}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {n_experts}]")
    return n_tokens, hidden_size, n_experts, width


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH = {"i32": torch.int32, "fp32": torch.float32}


def moe_shape(hidden: torch.Tensor, gate_up_proj: torch.Tensor, top_k: int, weight_format: str = "float") -> MoEShape:
    n_experts, two_width, _ = gate_up_proj.shape
    return MoEShape(_DTYPES[hidden.dtype], n_experts, hidden.shape[1], two_width // 2, top_k, weight_format)


def run_plan(
    shape: MoEShape, buffers: dict[str, torch.Tensor], n_tokens: int, stages: tuple[str, ...] = STAGES,
    bm: int | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Run launches of the plan (kernels.moe_launches) through Triton's JIT. `buffers` holds the inputs
    and the output by name; the intermediates are allocated here (and returned with them)."""
    specs = kernel_specs(shape, bm or tile_m(n_tokens, shape), upcast=_interpreting())
    device = next(iter(buffers.values())).device
    buffers = dict(buffers, n_tokens=n_tokens)
    for name, (dtype, dims) in intermediates(shape, n_tokens).items():
        buffers.setdefault(name, torch.empty(dims, dtype=_TORCH[dtype], device=device))
    grid = grids(specs, shape, n_tokens)
    for stage in stages:
        spec = specs[stage]
        kernel = globals()[spec.kernel]
        # by name: a format's absent scale parameters are among the constexprs (None)
        arguments = {param: buffers[arg] for (param, _), arg in zip(spec.signature, spec.args, strict=True)}
        kernel[grid[stage]](**arguments, **spec.constants(), num_warps=spec.num_warps, num_stages=spec.num_stages)
    return buffers


def quantized_experts(
    weight_format: str, gate_up_proj: np.ndarray, down_proj: np.ndarray
) -> tuple[tuple[torch.Tensor, ...], list[np.ndarray]]:
    """fp32 experts (gate_up [E, 2I, H], down [E, H, I], numpy) quantized as optimize stores them ->
    (what ``fused_moe`` takes from gate_up_proj on: the two weights then `scales`, as CPU tensors in
    contract.MOE_INPUTS order; the same tensors as numpy in their ONNX dtypes, which is what the
    graph's initializers hold and ``dequantize_experts`` reads)."""
    if weight_format == "fp8":
        (gu, gu_s), (dn, dn_s) = quantize_fp8(gate_up_proj), quantize_fp8(down_proj)
        stored = [gu, dn, gu_s, dn_s]
    elif weight_format == "nvfp4":
        (gu, gu_b, gu_g), (dn, dn_b, dn_g) = quantize_nvfp4(gate_up_proj), quantize_nvfp4(down_proj)
        stored = [gu, dn, gu_b, dn_b, gu_g, dn_g]
    else:
        raise ValueError(f"quantized_experts takes fp8 or nvfp4, not '{weight_format}'")

    def as_torch(array: np.ndarray) -> torch.Tensor:
        if array.dtype == FP4:  # the kernels read ONNX's packing: two codes a byte
            return torch.from_numpy(pack_fp4(array))
        if array.dtype == FP8:
            return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8)).view(torch.float8_e4m3fn)
        return torch.from_numpy(np.ascontiguousarray(array, np.float32))

    return tuple(as_torch(a) for a in stored), stored


def moe_route(
    router_logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run only the routing launch: (topk_ids [N, K] int32, weights [N, K] fp32), k in descending order."""
    if triton is None:
        raise RuntimeError("moe_route needs Triton: pip install 'dllm-trt[triton]'")
    n_tokens, n_experts = router_logits.shape
    shape = MoEShape("fp32", n_experts, 1, 1, top_k)
    inputs = dict(
        router_logits=router_logits.float().contiguous(), per_expert_scale=per_expert_scale.float().contiguous()
    )
    out = run_plan(shape, inputs, n_tokens, stages=("route",))
    return out["topk_ids"].view(n_tokens, top_k), out["topk_w"].view(n_tokens, top_k)  # [A] -> [N, K]


def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    bm: int | None = None,
    weight_format: str = "float",
    scales: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """``DllmMoE`` in 5 Triton launches (kernels.moe_launches). Returns [N, H] in ``hidden.dtype``.

    `bm` fixes the expert-block rows (the TensorRT plugin compiles one value); None picks one for N.
    Quantized experts: `weight_format` "fp8" (weights torch.float8_e4m3fn) or "nvfp4" (weights uint8,
    two e2m1 codes a byte: kernels.quantization.pack_fp4), `scales` the node's inputs after the
    weights, in contract.MOE_INPUTS order.
    """
    n_tokens, _, _, _ = _check_inputs(
        hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, top_k, weight_format, tuple(scales)
    )
    out = torch.empty_like(hidden)
    if n_tokens == 0:
        return out
    buffers = dict(
        hidden=hidden.contiguous(), router_logits=router_logits.float().contiguous(),
        per_expert_scale=per_expert_scale.float().contiguous(), gate_up_proj=gate_up_proj.contiguous(),
        down_proj=down_proj.contiguous(), out=out,
    )  # fmt: skip
    buffers |= {name: t.contiguous() for name, t in zip(MOE_INPUTS[weight_format][5:], scales, strict=True)}
    run_plan(moe_shape(hidden, gate_up_proj, top_k, weight_format), buffers, n_tokens, bm=bm)
    return out
