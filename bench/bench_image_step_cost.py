"""What the image inputs cost the step's text-only calls: the same text model exported with and without a tower.

`small` (text only) and `small-vision` (the same text widths plus a tower) are
exported and optimized for onnxruntime CPU in fp32; their step graphs differ only by the image inputs
(zero soft tokens on every call here) and the image-block overlay of the encoder mask. Timed
alternately in one process, one thread: an encoder pass over a prompt and a denoise step over the
canvas with a cache, median ms of each graph and the ratio vision / text.

    python bench/bench_image_step_cost.py [--prompt 256] [--repeats 30] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from dllm_trt import export, optimize
from dllm_trt.generation.kv_cache import StaticKVCache
from dllm_trt.generation.sampler import sampling_noise
from dllm_trt.generation.step import OnnxRuntimeStep
from dllm_trt.models.presets import make_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of the encoder pass")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-image-step-cost"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    steps = {}
    for preset in ("small", "small-vision"):
        ckpt, onnx_dir, fused = (args.workdir / f"{preset}-{kind}" for kind in ("ckpt", "onnx", "ort"))
        make_checkpoint(ckpt, preset, seed=0)
        export.run(export.ExportOptions(ckpt, onnx_dir, parity=False, quiet=True, max_soft_tokens=(70,)))
        optimize.run(optimize.OptimizeOptions(onnx_dir, fused, "ort-cpu", "fp32", parity="none", quiet=True))
        steps[preset] = OnnxRuntimeStep.from_artifacts(fused, threads=1)
    info = steps["small"].info
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (1, args.prompt), generator=gen)
    positions = torch.arange(args.prompt)[None, :]
    valid = torch.ones(1, args.prompt, dtype=torch.bool)
    canvas = info.canvas_length
    cache = StaticKVCache(steps["small"].specs, 1, args.prompt + canvas, info.sliding_window, info.dtype)
    cache.append(steps["small"].encode(ids, positions, valid, cache.mask(), cache.tensors()), valid)
    canvas_ids = torch.randint(0, 8000, (1, canvas), generator=gen)
    canvas_positions = torch.arange(args.prompt, args.prompt + canvas)[None, :]
    sc = torch.zeros(1, canvas, info.hidden_size)
    noise = sampling_noise(1, canvas, info.vocab_size, gen)
    empty = StaticKVCache(steps["small"].specs, 1, args.prompt, info.sliding_window, info.dtype)
    calls = {
        "encoder pass": lambda step: step.encode(ids, positions, valid, empty.mask(), empty.tensors()),
        "denoise step": lambda step: step.denoise_and_sample(
            canvas_ids, sc, canvas_positions, cache.mask(), cache.tensors(), torch.tensor(0.6), noise
        ),  # fmt: skip
    }
    times = {(call, preset): [] for call in calls for preset in steps}
    for _ in range(args.repeats + 3):  # three warm-ups, then alternate so that load drifts hit both alike
        for call, run in calls.items():
            for preset, step in steps.items():
                start = time.perf_counter()
                run(step)
                times[(call, preset)].append(time.perf_counter() - start)
    print(f"small preset, batch 1, prompt {args.prompt}, canvas {canvas}, onnxruntime CPU fp32 optimized, 1 thread, "
          f"median of {args.repeats}")  # fmt: skip
    print("| call | text-only step ms | image step ms (no image) | ratio |")
    print("|---|---:|---:|---:|")
    for call in calls:
        text, image = (1e3 * statistics.median(times[(call, p)][3:]) for p in ("small", "small-vision"))
        print(f"| {call} | {text:.2f} | {image:.2f} | {image / text:.3f} |")
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
