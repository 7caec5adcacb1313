"""Benchmark the long-head attention kernels (DllmAttention) at DiffusionGemma 26B's full-layer sizes on one GPU.

    PYTHONPATH=src python bench/bench_attention_kernel.py                     # contexts 4K, 32K, 256K
    PYTHONPATH=src python bench/bench_attention_kernel.py --contexts 4096 --json attention.json

Per context: one denoise step's attention on a full layer (a 256-token canvas over the cache: 16 query
heads over 2 key/value heads of 512, the graph's additive mask [B, 1, T, S]), in bf16. Compares
``flash_attention`` (the plan the TensorRT plugin runs: kernels.attention_launches) with torch's
``scaled_dot_product_attention`` on the same inputs and GPU (grouped heads, the same mask), median ms
over CUDA events after a warm-up; reports the bytes the kernel must read (Q, K, V, the mask, the output
written), the time that takes at the GPU's bandwidth (its byte floor: 3.35 TB/s H100, 4.8 TB/s H200),
the FLOP floor at its dense bf16 peak, the ratio of each time to the larger floor, and the max relative
error of both against ``attention_reference`` (fp32). `--json` writes every row. Needs torch and
triton; nothing from the network.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

Q_HEADS, KV_HEADS, HEAD_DIM, CANVAS = 16, 2, 512, 256  # the released full layers; one canvas
DEVICE = "cuda"  # tests run the bench's code paths on the CPU under TRITON_INTERPRET=1
PEAK = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}  # bytes/s, dense bf16 FLOP/s


def peaks(gpu_name: str) -> tuple[float, float, str]:
    for key, (bandwidth, flops) in PEAK.items():
        if key in gpu_name:
            return bandwidth, flops, key
    return *PEAK["H100"], "unknown GPU, H100's peaks assumed"


def inputs(batch: int, cached: int, gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    """A denoise step's attention inputs: the canvas's queries over cache + canvas, a mask with 5% of the
    cache invalid (padding), bidirectional as the step graph builds it."""
    from dllm_trt.models.diffusion_gemma import attention_bias

    keys = cached + CANVAS
    query = torch.randn(batch, Q_HEADS, CANVAS, HEAD_DIM, device=DEVICE, generator=gen)
    key = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=DEVICE, generator=gen)
    value = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=DEVICE, generator=gen)
    valid = torch.rand(batch, keys, device=DEVICE, generator=gen) > 0.05
    valid[:, cached:] = True
    bias = attention_bias(valid, CANVAS, False, None, dtype).expand(batch, 1, CANVAS, keys).contiguous()
    return [t.to(dtype) for t in (query, key, value)] + [bias]


def floors(batch: int, keys: int, element_bytes: int, bandwidth: float, flops: float) -> dict:
    read = batch * (2 * KV_HEADS * keys * HEAD_DIM + CANVAS * keys + 2 * Q_HEADS * CANVAS * HEAD_DIM) * element_bytes
    work = 4 * batch * Q_HEADS * CANVAS * keys * HEAD_DIM  # Q K^T and P V, a multiply-add each
    return dict(bytes=read, byte_floor_ms=1e3 * read / bandwidth, flop=work, flop_floor_ms=1e3 * work / flops)


def time_ms(fn, warmup: int, iters: int) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa(query, key, value, bias):  # noqa: ANN001, ANN201
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=1.0,
                                                            enable_gqa=True)  # fmt: skip


def bench_context(cached: int, batch: int, dtype: torch.dtype, args, gen, bandwidth: float, flops: float) -> list:  # noqa: ANN001
    from dllm_trt.kernels.attention_launches import splits
    from dllm_trt.kernels.attention_triton import attention_reference, attention_shape, flash_attention

    tensors = inputs(batch, cached, gen, dtype)
    keys = cached + CANVAS
    reference = attention_reference(*tensors).float()
    floor = floors(batch, keys, tensors[0].element_size(), bandwidth, flops)
    rows = []
    for impl, fn in (("flash_attention", lambda: flash_attention(*tensors)), ("torch_sdpa", lambda: sdpa(*tensors))):
        try:
            out = fn()
            ms = time_ms(fn, args.warmup, args.iters)
        except torch.OutOfMemoryError as exc:  # torch's fallback may materialise the scores
            rows.append(dict(impl=impl, context=keys, batch=batch, error=f"out of memory: {exc}"[:200]))
            continue
        err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
        bound = max(floor["byte_floor_ms"], floor["flop_floor_ms"])
        rows.append(dict(impl=impl, context=keys, batch=batch, ms=round(ms, 4), x_floor=round(ms / bound, 2),
                         max_rel_err=err, **floor))  # fmt: skip
    rows[0]["splits"] = splits(attention_shape(tensors[0], tensors[1]), batch, CANVAS, keys)[0]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 262144], help="cached positions")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: the bench times GPU kernels")
    name = torch.cuda.get_device_name()
    bandwidth, flops, which = peaks(name)
    print(f"{name}: floors from {which} ({bandwidth / 1e12} TB/s, {flops / 1e12:.0f} TFLOP/s bf16)")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    print("| impl | keys | batch | ms | x floor | byte floor ms | FLOP floor ms | splits | max rel err |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cached in args.contexts:
        for row in bench_context(cached, args.batch, torch.bfloat16, args, gen, bandwidth, flops):
            rows.append(row)
            if "error" in row:
                print(f"| {row['impl']} | {row['context']} | {row['batch']} | {row['error']} |")
                continue
            print(f"| {row['impl']} | {row['context']} | {row['batch']} | {row['ms']} | {row['x_floor']} | "
                  f"{row['byte_floor_ms']:.4f} | {row['flop_floor_ms']:.4f} | {row.get('splits', '')} | "
                  f"{row['max_rel_err']:.2e} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=name, rows=rows), indent=1))


if __name__ == "__main__":
    main()
