"""Time the MoE chain that `build` lowers each DllmMoE node into, against fused_moe, on one CUDA GPU.

    PYTHONPATH=src python bench/bench_moe_chain.py             # N = 256 and 2048, bf16, 26B-A4B sizes

``engines.moe_chain_plugin.lowered_moe`` runs route, bucket, expert-up and expert-down with exactly the
specs (tiles, warps) and grids the TensorRT AOT plugins use, then a torch sum over K and a cast (the
ReduceSum + Cast of the lowered graph), through Triton's JIT; per BM tactic (16, 32, 64). It is the
plugin chain minus TensorRT: what TensorRT can pick from when it times the tactics. Prints median ms
of CUDA-graph replays, the ratio to fused_moe and to the one-launch kernel the DllmMoE plugin embeds,
and max abs error against moe_reference in fp32. Needs only torch and triton.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HIDDEN, EXPERTS, WIDTH, TOP_K = 2816, 128, 704, 8


def graph_ms(fn, iters: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    samples = []
    for _ in range(iters):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    from dllm_trt.engines.moe_chain_plugin import M_TILES, lowered_moe
    from dllm_trt.kernels.moe_triton import fused_moe, fused_moe_single_launch, moe_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    dtype = torch.bfloat16
    gate_up = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device="cuda", generator=gen) * HIDDEN**-0.5).to(dtype)
    down = (torch.randn(EXPERTS, HIDDEN, WIDTH, device="cuda", generator=gen) * WIDTH**-0.5).to(dtype)
    scale = torch.rand(EXPERTS, device="cuda", generator=gen) + 0.5
    print(f"{torch.cuda.get_device_name()}  bf16  H={HIDDEN} E={EXPERTS} I={WIDTH} K={TOP_K}")
    for n in (256, 2048):
        hidden = torch.randn(n, HIDDEN, device="cuda", generator=gen).to(dtype)
        logits = torch.randn(n, EXPERTS, device="cuda", generator=gen)
        args = (hidden, logits, scale, gate_up, down, TOP_K)
        ref = moe_reference(*args).float()
        base = graph_ms(lambda args=args: fused_moe(*args))
        line = [f"N={n:5d}  fused_moe {base:7.3f} ms"]
        for bm in M_TILES:
            err = (lowered_moe(*args, bm=bm).float() - ref).abs().max().item()
            ms = graph_ms(lambda bm=bm, args=args: lowered_moe(*args, bm=bm))
            line.append(f"chain BM={bm} {ms:7.3f} ms ({ms / base:4.2f}x, err {err:.1e})")
        if n <= 256:
            single = graph_ms(lambda args=args: fused_moe_single_launch(*args), iters=5)
            line.append(f"single-launch plugin kernel {single:8.3f} ms")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
