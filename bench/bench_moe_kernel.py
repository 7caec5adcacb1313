"""Benchmark the fused MoE experts at DiffusionGemma 26B sizes on one CUDA GPU.

    PYTHONPATH=src python bench/bench_moe_kernel.py            # N = 256, 1024, 2048; bf16, fp8, nvfp4 experts
    PYTHONPATH=src python bench/bench_moe_kernel.py --tokens 256 --formats nvfp4 --json moe.json

Compares, per token count N (256 = one batch-1 denoise step) and per expert format: ``fused_moe``
(5 Triton launches, the plan the TensorRT plugin runs) with the experts stored in the activations'
dtype, in fp8 and in NVFP4 (quantized from the same fp32 experts exactly as `optimize --precision`
stores them, on the GPU by kernels.expert_formats; dequantized inside the kernels); for the unquantized
experts also a dense torch form (every expert on every token) and a per-expert gather loop like
transformers' eager experts.
Prints median ms (CUDA events) called eagerly and replayed from a CUDA graph (what an engine or a
captured runtime pays), the bytes of the experts actually routed to in their stored format (values
and scales), the bandwidth that implies, the ratio to that format's weight-read floor (3.35 TB/s
H100, 4.8 TB/s H200), the speed-up over the unquantized fused_moe of the same run, and max abs error
against ``moe_reference`` computed in fp32 over the experts as stored (dequantized). A short
correctness preflight (fp32, odd sizes; each quantized format; routing ties against CUDA
torch.topk) runs first. `--json` writes every row. Needs only torch and triton; no network.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

HIDDEN, EXPERTS, WIDTH, TOP_K = 2816, 128, 704, 8
DEVICE = "cuda"  # tests run the bench's code paths on the CPU under TRITON_INTERPRET=1
PEAK_TBPS = {"H200": 4.8, "H100": 3.35}
CAPTURABLE = {"fused_moe", "torch_dense"}  # torch_loop syncs on the host (unique/where)


def peak_bandwidth(gpu_name: str) -> tuple[float, str]:
    for key, tbps in PEAK_TBPS.items():
        if key in gpu_name:
            return tbps * 1e12, f"{key} {tbps} TB/s"
    return PEAK_TBPS["H100"] * 1e12, f"unknown GPU, H100's {PEAK_TBPS['H100']} TB/s assumed"


FORMATS = ("float", "fp8", "nvfp4")  # contract.MOE_WEIGHT_FORMATS; "float" = the activations' dtype


def make_weights(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 experts (every format is made from these) and the per-expert routing scale."""
    gate_up = torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device=DEVICE, generator=gen) * HIDDEN**-0.5
    down = torch.randn(EXPERTS, HIDDEN, WIDTH, device=DEVICE, generator=gen) * WIDTH**-0.5
    scale = torch.rand(EXPERTS, device=DEVICE, generator=gen) + 0.5
    return gate_up, down, scale


def format_case(weight_format: str, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> dict:
    """The experts as fused_moe takes them in one format, what moe_reference takes for them (fp32, as
    stored), and the bytes one expert occupies in that format (values and scales)."""
    from dllm_trt.kernels.expert_formats import store_experts

    if weight_format == "float":
        weights, scales = (gate_up.to(dtype), down.to(dtype)), ()
        reference = weights
    else:
        # on the device, byte for byte what optimize stores (kernels.expert_formats; the host's numpy took ~40 s)
        started = time.perf_counter()
        stored = store_experts(weight_format, gate_up, down, dtype)
        weights, scales = (stored.gate_up, stored.down), stored.scales
        reference = stored.dequantized()
        seconds = time.perf_counter() - started
        print(f"  {weight_format}: quantized {len(gate_up)} experts on {DEVICE} in {seconds:.2f} s")
    per_expert = sum(t.numel() * t.element_size() for t in (*weights, *scales)) / len(gate_up)
    return dict(weights=weights, scales=scales, reference=reference, bytes_per_expert=per_expert)


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


def preflight_quantized() -> dict[str, float]:
    """fp8 and nvfp4 experts on odd sizes (multiples of 16 along both input axes, as NVFP4 blocks need)
    against moe_reference over the experts as stored; max abs error per format, fp32 activations."""
    from dllm_trt.kernels import moe_triton as mt

    gen = torch.Generator(device=DEVICE).manual_seed(2)
    n, h, e, i, k = 37, 208, 24, 80, 5
    hidden = torch.randn(n, h, device=DEVICE, generator=gen)
    logits = torch.randn(n, e, device=DEVICE, generator=gen) * 2
    scale = torch.rand(e, device=DEVICE, generator=gen) + 0.5
    gate_up = torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) * h**-0.5
    down = torch.randn(e, h, i, device=DEVICE, generator=gen) * i**-0.5
    errors = {}
    for weight_format in FORMATS[1:]:
        case = format_case(weight_format, gate_up, down, torch.float32)
        ref = mt.moe_reference(hidden, logits, scale, *case["reference"], k)
        out = mt.fused_moe(
            hidden, logits, scale, *case["weights"], k, weight_format=weight_format, scales=case["scales"]
        )
        errors[weight_format] = (out - ref).abs().max().item()
    return errors


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
    for weight_format, err in preflight_quantized().items():
        print(f"preflight {weight_format} experts, fp32 activations N=37 H=208 I=80: max abs err {err:.2e}")
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


def bench_tokens(n_tokens, cases, dtype, args, gen, peak) -> list[dict]:
    """Time every format's implementations on one set of N tokens; returns the rows printed."""
    from dllm_trt.kernels import moe_triton as mt

    hidden = torch.randn(n_tokens, HIDDEN, device=DEVICE, generator=gen).to(dtype)
    logits = torch.randn(n_tokens, EXPERTS, device=DEVICE, generator=gen)  # random router logits
    scale = cases["scale"]
    routed = torch.unique(mt.route_reference(logits, scale, TOP_K)[0]).numel()
    rows, baseline = [], None
    for weight_format in args.formats:
        case = cases[weight_format]
        weight_bytes = routed * case["bytes_per_expert"]
        floor_ms = weight_bytes / peak * 1e3
        ref = mt.moe_reference(hidden, logits, scale, *case["reference"], TOP_K).float()  # fp32 math inside
        impls = {"fused_moe": mt.fused_moe}
        if weight_format == "float":
            impls |= {"torch_dense": dense_all_experts, "torch_loop": per_expert_loop}
        for name, fn in impls.items():
            quantized = dict(weight_format=weight_format, scales=case["scales"]) if weight_format != "float" else {}
            call = lambda fn=fn, w=case["weights"], q=quantized: fn(hidden, logits, scale, *w, TOP_K, **q)  # noqa: E731
            err = (call().float() - ref).abs().max().item()
            eager = time_ms(call, args.warmup, args.iters, args.budget_s)
            graph = time_graph_ms(call, args.warmup, args.iters, args.budget_s) if name in CAPTURABLE else None
            ms = graph if graph is not None else eager
            if weight_format == "float" and name == "fused_moe":
                baseline = ms
            label = args.dtype if weight_format == "float" else weight_format
            row = dict(
                experts_format=label, impl=name, tokens=n_tokens, eager_ms=eager, graph_ms=graph, experts_routed=routed,
                weight_mb=weight_bytes / 1e6, gb_per_s=weight_bytes / (ms * 1e-3) / 1e9, x_floor=ms / floor_ms,
                floor_ms=floor_ms, speedup_vs_unquantized=(baseline / ms) if baseline else None, max_abs_err=err,
            )  # fmt: skip
            rows.append(row)
            graph_txt = f"{graph:>9.3f}" if graph is not None else f"{'n/a':>9}"
            speedup = f"{row['speedup_vs_unquantized']:>7.2f}x" if baseline else f"{'n/a':>8}"
            print(
                f"{label:>6} {name:>12} {n_tokens:>6} {eager:>9.3f} {graph_txt} {routed:>7} {row['weight_mb']:>9.1f} "
                f"{row['gb_per_s']:>8.0f} {row['x_floor']:>8.2f}x {speedup} {err:>10.2e}"
            )
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=3.0, help="stop timing one case after this long")
    parser.add_argument("--no-preflight", action="store_true")
    parser.add_argument(
        "--formats", default=",".join(FORMATS), help="expert formats, of: float (the --dtype), fp8, nvfp4"
    )
    parser.add_argument("--json", type=Path, help="write every row (and the GPU's name) to this file")
    args = parser.parse_args()
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(args.formats) - set(FORMATS))
    if unknown or not args.formats:
        print(f"--formats: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(FORMATS)}")
        return 2
    if "float" in args.formats:  # first: the speed-ups of the quantized formats are against it
        args.formats.remove("float")
        args.formats.insert(0, "float")

    if not torch.cuda.is_available():
        print("bench_moe_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    try:
        import triton
    except ImportError:
        print("bench_moe_kernel.py needs triton (pip install 'dllm-trt[triton]').")
        return 2

    gpu = torch.cuda.get_device_name()
    peak, peak_label = peak_bandwidth(gpu)
    print(f"GPU {gpu}; torch {torch.__version__}; triton {triton.__version__}; floor at {peak_label}")
    print(f"H={HIDDEN} E={EXPERTS} I={WIDTH} K={TOP_K} dtype={args.dtype}")
    if not args.no_preflight:
        preflight()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up, down, scale = make_weights(gen)
    cases = {f: format_case(f, gate_up, down, dtype) for f in args.formats} | dict(scale=scale)
    del gate_up, down
    torch.cuda.empty_cache()
    print("weight_MB = bytes of the experts routed to, as stored (3*I*H values and their scales). GB/s, x_floor")
    print("and vs_float use graph_ms (CUDA graph replay: GPU time without launch overhead) where the impl can be")
    print(f"captured, eager_ms otherwise; vs_float = the {args.dtype} fused_moe's time over this row's.")
    header = (
        f"{'format':>6} {'impl':>12} {'N':>6} {'eager_ms':>9} {'graph_ms':>9} {'experts':>7} {'weight_MB':>9} "
        f"{'GB/s':>8} {'x_floor':>9} {'vs_float':>8}"
    )
    print(f"{header} {'max_abs_err':>10}")
    rows = []
    for n_tokens in args.tokens:
        rows += bench_tokens(n_tokens, cases, dtype, args, gen, peak)
    if args.json:
        summary = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, peak_bytes_per_s=peak,
                       hidden=HIDDEN, experts=EXPERTS, width=WIDTH, top_k=TOP_K, rows=rows)  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
