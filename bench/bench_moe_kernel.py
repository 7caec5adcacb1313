"""Benchmark the fused MoE experts at DiffusionGemma 26B sizes on one CUDA GPU.

    PYTHONPATH=src python bench/bench_moe_kernel.py            # N = 256, 1024, 2048, bf16

Compares, per token count N (256 = one batch-1 denoise step): ``fused_moe`` (5 Triton launches,
the plan the TensorRT plugin runs), a dense torch form (every expert on every token) and a
per-expert gather loop like transformers' eager experts. Prints median ms (CUDA events) called
eagerly and replayed from a CUDA graph (what an engine or a captured runtime pays), the
bytes of the experts actually routed to, the bandwidth that implies, the ratio to the
weight-read floor (3.35 TB/s H100, 4.8 TB/s H200), and max abs error against ``moe_reference``
computed in fp32. A short correctness preflight (fp32, odd sizes, both Triton paths; routing
ties against CUDA torch.topk) runs first. Needs only torch and triton; no network.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HIDDEN, EXPERTS, WIDTH, TOP_K = 2816, 128, 704, 8
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}
CAPTURABLE = {"fused_moe", "torch_dense"}  # torch_loop syncs on the host (unique/where)


def peak_bandwidth(gpu_name: str) -> tuple[float, str]:
    for key, tbps in PEAK_TBPS.items():
        if key in gpu_name:
            return tbps * 1e12, f"{key} {tbps} TB/s"
    return PEAK_TBPS["H100"] * 1e12, f"unknown GPU, H100's {PEAK_TBPS['H100']} TB/s assumed"


def make_weights(dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate_up = torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device="cuda", generator=gen, dtype=dtype) * HIDDEN**-0.5
    down = torch.randn(EXPERTS, HIDDEN, WIDTH, device="cuda", generator=gen, dtype=dtype) * WIDTH**-0.5
    scale = torch.rand(EXPERTS, device="cuda", generator=gen) + 0.5
    return gate_up, down, scale


def dense_all_experts(hidden, logits, scale, gate_up, down, top_k):
    """Every expert on every token, then the routing weights mask the sum (the export-friendly form)."""
    from dllm_trt.kernels.moe_triton import route_reference

    ids, weights = route_reference(logits, scale, top_k)
    dense_w = torch.zeros(logits.shape, device=logits.device).scatter(1, ids, weights)  # [N, E]
    gu = torch.matmul(hidden, gate_up.transpose(1, 2))  # [E, N, 2I]
    gate, up = gu.split(WIDTH, dim=-1)
    act = torch.nn.functional.gelu(gate, approximate="tanh") * up  # [E, N, I]
    y = torch.bmm(act, down.transpose(1, 2))  # [E, N, H]
    return torch.einsum("enh,ne->nh", y.float(), dense_w).to(hidden.dtype)


def per_expert_loop(hidden, logits, scale, gate_up, down, top_k):
    """Gather the tokens of each routed expert, like transformers' eager DiffusionGemmaTextExperts."""
    from dllm_trt.kernels.moe_triton import route_reference

    ids, weights = route_reference(logits, scale, top_k)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(ids).tolist():
        rows, slots = torch.where(ids == expert)
        gate, up = torch.nn.functional.linear(hidden[rows], gate_up[expert]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.gelu(gate, approximate="tanh") * up, down[expert])
        out.index_add_(0, rows, y.float() * weights[rows, slots, None])
    return out.to(hidden.dtype)


def time_ms(fn, warmup: int, iters: int, budget_s: float) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples, started = [], time.perf_counter()
    while len(samples) < iters and (len(samples) < 3 or time.perf_counter() - started < budget_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return statistics.median(samples)


def time_graph_ms(fn, warmup: int, iters: int, budget_s: float) -> float | None:
    """Median ms of replaying ``fn`` captured in a CUDA graph (no launch overhead); None if capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # report and go on with the eager number
        print(f"  (CUDA graph capture failed: {exc})")
        return None
    return time_ms(graph.replay, warmup, iters, budget_s)


def preflight() -> None:
    """fp32 on odd sizes through the compiled kernels, and routing ties against CUDA torch.topk."""
    from dllm_trt.kernels import moe_triton as mt

    gen = torch.Generator(device="cuda").manual_seed(1)
    n, h, e, i, k = 37, 200, 24, 72, 5
    args = (
        torch.randn(n, h, device="cuda", generator=gen),
        torch.randn(n, e, device="cuda", generator=gen) * 2,
        torch.rand(e, device="cuda", generator=gen) + 0.5,
        torch.randn(e, 2 * i, h, device="cuda", generator=gen) * h**-0.5,
        torch.randn(e, h, i, device="cuda", generator=gen) * i**-0.5,
    )
    ref = mt.moe_reference(*args, k)
    err = (mt.fused_moe(*args, k) - ref).abs().max().item()
    print(f"preflight fp32 N={n} H={h} E={e} I={i} K={k} fused_moe: max abs err {err:.2e}")
    logits = torch.zeros(4, EXPERTS, device="cuda")
    logits[2:, 5:] = 1.0  # more than K equal maxima
    ours, _ = mt.moe_route(logits, torch.ones(EXPERTS, device="cuda"), TOP_K)
    theirs = torch.topk(torch.softmax(logits, -1), TOP_K).indices
    print(f"preflight exact ties: ours {ours[0].tolist()} / {ours[2].tolist()}")
    print(f"                      CUDA torch.topk {theirs[0].tolist()} / {theirs[2].tolist()}")
    logits = torch.randn(4096, EXPERTS, device="cuda")
    ours, _ = mt.moe_route(logits, torch.ones(EXPERTS, device="cuda"), TOP_K)
    theirs = torch.topk(torch.softmax(logits, -1), TOP_K).indices
    agree = (ours.long() == theirs).all(dim=1).float().mean().item()
    print(f"preflight random logits N=4096: ordered top-k id agreement with CUDA torch {agree:.4f}")


def bench_tokens(n_tokens, impls, weights, dtype, args, gen, peak) -> None:
    from dllm_trt.kernels.moe_triton import moe_reference, route_reference

    gate_up, down, scale = weights
    hidden = torch.randn(n_tokens, HIDDEN, device="cuda", generator=gen).to(dtype)
    logits = torch.randn(n_tokens, EXPERTS, device="cuda", generator=gen)  # random router logits
    routed = torch.unique(route_reference(logits, scale, TOP_K)[0]).numel()
    weight_bytes = routed * 3 * WIDTH * HIDDEN * gate_up.element_size()
    floor_ms = weight_bytes / peak * 1e3
    ref = moe_reference(hidden, logits, scale, gate_up, down, TOP_K).float()  # fp32 math inside
    for name, fn in impls.items():
        call = lambda fn=fn: fn(hidden, logits, scale, gate_up, down, TOP_K)  # noqa: E731
        err = (call().float() - ref).abs().max().item()
        eager = time_ms(call, args.warmup, args.iters, args.budget_s)
        graph = time_graph_ms(call, args.warmup, args.iters, args.budget_s) if name in CAPTURABLE else None
        ms = graph if graph is not None else eager
        gbps = weight_bytes / (ms * 1e-3) / 1e9
        graph_txt = f"{graph:>9.3f}" if graph is not None else f"{'n/a':>9}"
        print(
            f"{name:>14} {n_tokens:>6} {eager:>9.3f} {graph_txt} {routed:>7} {weight_bytes / 1e6:>9.1f} "
            f"{gbps:>8.0f} {ms / floor_ms:>8.2f}x {err:>10.2e}"
        )
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=3.0, help="stop timing one case after this long")
    parser.add_argument("--no-preflight", action="store_true")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_moe_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    try:
        import triton
    except ImportError:
        print("bench_moe_kernel.py needs triton (pip install 'dllm-trt[triton]').")
        return 2
    from dllm_trt.kernels import moe_triton as mt

    gpu = torch.cuda.get_device_name()
    peak, peak_label = peak_bandwidth(gpu)
    print(f"GPU {gpu}; torch {torch.__version__}; triton {triton.__version__}; floor at {peak_label}")
    print(f"H={HIDDEN} E={EXPERTS} I={WIDTH} K={TOP_K} dtype={args.dtype}")
    if not args.no_preflight:
        preflight()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = make_weights(dtype, gen)
    impls = {
        "fused_moe": mt.fused_moe,
        "torch_dense": dense_all_experts,
        "torch_loop": per_expert_loop,
    }
    print("weight_MB = bytes of the experts routed to (3*I*H each). GB/s and x_floor use graph_ms (CUDA graph")
    print("replay: GPU time without launch overhead) where the impl can be captured, eager_ms otherwise.")
    header = (
        f"{'impl':>14} {'N':>6} {'eager_ms':>9} {'graph_ms':>9} {'experts':>7} {'weight_MB':>9} {'GB/s':>8} "
        f"{'x_floor':>9}"
    )
    print(f"{header} {'max_abs_err':>10}")
    for n_tokens in args.tokens:
        bench_tokens(n_tokens, impls, weights, dtype, args, gen, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
