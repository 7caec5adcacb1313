"""The Triton MoE kernels under TRITON_INTERPRET=1 against the torch oracle and transformers' own modules."""

import importlib
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

# Reload: if anything imported the module before the interpreter was switched on, its kernels were
# built for a GPU; reloading re-decorates them as interpreted functions.
mt = importlib.reload(importlib.import_module("dllm_trt.kernels.moe_triton"))

IMPLS = {
    "fused_moe": mt.fused_moe,
    # what the TensorRT plugin compiles: one expert-block size whatever N, here the largest
    "fused_moe_bm64": lambda *args: mt.fused_moe(*args, bm=64),
}
# deliberately odd: no power of two anywhere, H not a multiple of any tile
HIDDEN, EXPERTS, WIDTH, TOP_K = 40, 12, 24, 3


def _weights(n_tokens, hidden=HIDDEN, experts=EXPERTS, width=WIDTH, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(n_tokens, hidden, generator=gen)
    logits = torch.randn(n_tokens, experts, generator=gen) * 2.0
    scale = torch.rand(experts, generator=gen) + 0.5  # non-trivial per_expert_scale
    gate_up = torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5
    down = torch.randn(experts, hidden, width, generator=gen) / width**0.5
    return hidden_states.to(dtype), logits, scale, gate_up.to(dtype), down.to(dtype)


def _errors(out, ref):
    diff = (out.float() - ref.float()).abs()
    return diff.max().item(), (diff / ref.float().abs().clamp_min(1e-3)).max().item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_tokens", [1, 7, 64])
def test_matches_reference_fp32(impl, n_tokens):
    args = _weights(n_tokens)
    ref = mt.moe_reference(*args, TOP_K)
    out = IMPLS[impl](*args, TOP_K)
    max_abs, max_rel = _errors(out, ref)
    print(f"\n[{impl} N={n_tokens} fp32] max abs err {max_abs:.3e}  max rel err {max_rel:.3e}")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_smoke(impl):
    args = _weights(9, dtype=torch.bfloat16)
    ref = mt.moe_reference(*args, TOP_K)
    out = IMPLS[impl](*args, TOP_K)
    max_abs, max_rel = _errors(out, ref)
    print(f"\n[{impl} N=9 bf16] max abs err {max_abs:.3e}  max rel err {max_rel:.3e}")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_tokens", [1, 7, 64])
def test_matches_transformers_router_and_experts(impl, n_tokens, hf_router_and_experts):
    router, experts = hf_router_and_experts(HIDDEN, EXPERTS, TOP_K, WIDTH)
    gen = torch.Generator().manual_seed(n_tokens)
    routing_input = torch.randn(n_tokens, HIDDEN, generator=gen)  # the residual stream
    expert_input = torch.randn(n_tokens, HIDDEN, generator=gen)  # after pre_feedforward_layernorm_2
    captured = {}
    hook = router.proj.register_forward_hook(lambda _m, _i, out: captured.setdefault("logits", out))
    with torch.no_grad():
        _, hf_weights, hf_index = router(routing_input)
        hf_out = experts(expert_input, hf_index, hf_weights)
    hook.remove()
    logits = captured["logits"]  # the DllmMoE node's router_logits input

    ids, weights = mt.moe_route(logits, router.per_expert_scale.detach(), TOP_K)
    assert torch.equal(ids.long(), hf_index), "expert ids differ from DiffusionGemmaTextRouter"
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        out = IMPLS[impl](expert_input, logits, router.per_expert_scale, experts.gate_up_proj, experts.down_proj, TOP_K)
    max_abs, max_rel = _errors(out, hf_out)
    print(f"\n[{impl} N={n_tokens} vs transformers] max abs err {max_abs:.3e}  max rel err {max_rel:.3e}")
    torch.testing.assert_close(out, hf_out, atol=2e-5, rtol=1e-4)


# ---- routing on adversarial logits --------------------------------------------------------------


def _route_both(logits, experts=EXPERTS, top_k=TOP_K):
    scale = torch.linspace(0.5, 1.5, experts)
    ids, weights = mt.moe_route(logits, scale, top_k)
    ref_ids, ref_weights = mt.route_reference(logits, scale, top_k)
    return ids.long(), weights, ref_ids, ref_weights


def _agreement(ids, ref_ids):
    ordered = (ids == ref_ids).all(dim=1).float().mean().item()
    as_sets = (ids.sort(dim=1).values == ref_ids.sort(dim=1).values).all(dim=1).float().mean().item()
    return ordered, as_sets


def _near_tie_logits(gap, n_tokens=64, experts=EXPERTS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_tokens, 1, generator=gen)
    offsets = torch.stack([torch.randperm(experts, generator=gen) for _ in range(n_tokens)]).float()
    return base + gap * offsets  # every row: E distinct values, neighbours `gap` apart


@pytest.mark.parametrize("case", ["all_negative", "near_tie_1e-3", "near_tie_1e-5"])
def test_topk_ids_agree_on_distinct_logits(case):
    gen = torch.Generator().manual_seed(3)
    if case == "all_negative":
        logits = -(torch.rand(64, EXPERTS, generator=gen) * 30.0 + 60.0)  # softmax of large negatives
    else:
        logits = _near_tie_logits(float(case.split("_")[-1]))
    ids, weights, ref_ids, ref_weights = _route_both(logits)
    ordered, as_sets = _agreement(ids, ref_ids)
    print(f"\n[routing {case}] top-k id agreement: ordered {ordered:.3f}, as sets {as_sets:.3f}")
    assert ordered == 1.0
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def _ulp_ladder(ulps, n_tokens=64, experts=EXPERTS, seed=5):
    # per row: E distinct logits, each `ulps` float32 steps above the previous, randomly permuted
    gen = torch.Generator().manual_seed(seed)
    column = torch.randn(n_tokens, 1, generator=gen)
    columns = [column]
    for _ in range(experts - 1):
        for _ in range(ulps):
            column = torch.nextafter(column, torch.full_like(column, float("inf")))
        columns.append(column)
    ladder = torch.cat(columns, dim=1)
    perm = torch.stack([torch.randperm(experts, generator=gen) for _ in range(n_tokens)])
    return torch.gather(ladder, 1, perm)


def test_topk_ids_on_ulp_close_logits_differ_only_inside_torch_ties():
    # Logits 4 ulps apart are distinct, but torch's fp32 softmax maps many of them to equal
    # probabilities and then orders those ties arbitrarily. We follow the logits, so any
    # disagreement must sit inside such a tie: same multiset of torch probabilities.
    logits = _ulp_ladder(4)
    ids, _, ref_ids, _ = _route_both(logits)
    ordered, as_sets = _agreement(ids, ref_ids)
    probs = torch.softmax(logits, dim=-1)
    torch_ties = (probs.sort(dim=1).values.diff(dim=1) == 0).any(dim=1).float().mean().item()
    print(
        f"\n[routing 4-ulp logit gaps] top-k id agreement: ordered {ordered:.3f}, as sets {as_sets:.3f}; "
        f"rows where torch's probs tie: {torch_ties:.3f}"
    )
    ours = probs.gather(1, ids).sort(dim=1).values
    theirs = probs.gather(1, ref_ids).sort(dim=1).values
    assert torch.equal(ours, theirs)
    # the logit order itself is what we pick: strictly descending logits
    picked = logits.gather(1, ids)
    assert (picked[:, :-1] > picked[:, 1:]).all()
    assert torch.equal(picked[:, -1], logits.topk(TOP_K, dim=1).values[:, -1])


def test_exact_ties_inside_topk_agree_as_sets():
    # top-K values come in exactly tied pairs, all strictly above the rest: the set is unambiguous
    gen = torch.Generator().manual_seed(4)
    rows = []
    for _ in range(64):
        row = torch.rand(EXPERTS, generator=gen) - 5.0
        top = torch.randperm(EXPERTS, generator=gen)[:TOP_K]
        row[top] = torch.tensor([3.0, 3.0, 1.5][:TOP_K])
        rows.append(row)
    logits = torch.stack(rows)
    ids, weights, ref_ids, ref_weights = _route_both(logits)
    ordered, as_sets = _agreement(ids, ref_ids)
    print(f"\n[routing exact ties inside top-k] agreement: ordered {ordered:.3f}, as sets {as_sets:.3f}")
    assert as_sets == 1.0
    dense = torch.zeros(64, EXPERTS).scatter(1, ids, weights)  # order-free comparison of weights
    ref_dense = torch.zeros(64, EXPERTS).scatter(1, ref_ids, ref_weights)
    torch.testing.assert_close(dense, ref_dense, atol=1e-6, rtol=1e-5)
    args = _weights(64)
    out = mt.fused_moe(args[0], logits, *args[2:], TOP_K)
    torch.testing.assert_close(out, mt.moe_reference(args[0], logits, *args[2:], TOP_K), atol=2e-5, rtol=1e-4)


def test_exact_ties_across_the_boundary_pick_lowest_index():
    # torch.topk's choice among equal values is unspecified; ours is the lowest expert index
    logits = torch.zeros(8, EXPERTS)
    logits[4:, 5:] = 1.0  # rows 4..7: E-5 equal maxima, more than K of them
    ids, weights, ref_ids, ref_weights = _route_both(logits)
    ordered, as_sets = _agreement(ids, ref_ids)
    print(
        f"\n[routing exact ties across the boundary] ours {ids[0].tolist()} / {ids[4].tolist()}, "
        f"torch {ref_ids[0].tolist()} / {ref_ids[4].tolist()}; agreement ordered {ordered:.3f}, "
        f"as sets {as_sets:.3f}"
    )
    assert ids[:4].tolist() == [list(range(TOP_K))] * 4
    assert ids[4:].tolist() == [list(range(5, 5 + TOP_K))] * 4
    # torch's pick is an equally valid top-k: same probabilities, hence same pre-scale weights
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, ref_ids))


def test_rejects_bad_inputs_and_handles_empty():
    hidden, logits, scale, gate_up, down = _weights(4)
    with pytest.raises(ValueError, match="down_proj"):
        mt.fused_moe(hidden, logits, scale, gate_up, down[:, :, :-1], TOP_K)
    with pytest.raises(ValueError, match="top_k"):
        mt.fused_moe(hidden, logits, scale, gate_up, down, EXPERTS + 1)
    empty = mt.fused_moe(hidden[:0], logits[:0], scale, gate_up, down, TOP_K)
    assert empty.shape == (0, HIDDEN)
