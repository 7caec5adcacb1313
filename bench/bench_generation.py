"""End-to-end generation on the `small` preset: transformers vs exported vs optimized graphs, one run.

    python bench/bench_generation.py [--workdir DIR] [--max-new-tokens 128] [--seed 0] [--batch 1]

Makes (or reuses) a `small` checkpoint, exports it, optimizes it for ort-cpu (fp32), then runs the
same generation (same seed, same prompt) in a fresh process per backend:
  - transformers `generate()` (eager PyTorch, the reference),
  - the loop over transformers' own modules (dllm-trt's torch backend),
  - the loop over the exported graphs in onnxruntime (logits leave the graph; the sampling head
    runs in torch),
  - the loop over the optimized graphs in onnxruntime (fused, sampling head in the graph),
and prints tokens/s, denoise-step latency (median, p90), peak RSS, the ratios, and whether the
token ids are identical. Then a denoise-step latency table versus canvas length and cache length
(exported vs optimized), each canvas length a separate export of the same preset.
Every process warms up with one untimed generation before the timed one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [[2, 17, 423, 1024, 9, 311, 77, 5000]]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_generate(mode: str, workdir: Path, max_new_tokens: int, seed: int, batch: int) -> dict:
    import torch

    from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
    from dllm_trt.generation.step import OnnxRuntimeStep
    from dllm_trt.models.checkpoint import load_model

    ids, mask = left_pad(PROMPTS * batch, 0)
    if mode == "transformers":
        model = load_model(workdir / "checkpoint")
        step_times: list[float] = []
        original = model.forward

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            out = original(*args, **kwargs)
            if kwargs.get("decoder_input_ids") is not None:
                step_times.append(time.perf_counter() - start)
            return out

        model.forward = timed

        def run() -> torch.Tensor:
            step_times.clear()
            torch.manual_seed(seed)
            return model.generate(ids, attention_mask=mask.long(), max_new_tokens=max_new_tokens).sequences

        run()  # warm-up
        start = time.perf_counter()
        sequences = run()
        seconds = time.perf_counter() - start
        new_tokens = int((sequences[:, ids.shape[1] :] != 0).sum())
    else:
        directory = workdir / ("optimized" if mode == "ort-optimized" else "onnx")
        if mode == "torch":  # the loop over transformers' own modules (the torch backend)
            from dllm_trt.generation.step import TorchStep

            step = TorchStep(load_model(workdir / "checkpoint"))
        else:
            step = OnnxRuntimeStep.from_artifacts(directory)
        settings = GenerationSettings.from_generation_config(
            json.loads((directory / "generation_config.json").read_text()), max_new_tokens=max_new_tokens
        )
        generate(step, settings, ids, mask, seed=seed)  # warm-up
        result = generate(step, settings, ids, mask, seed=seed)
        sequences, seconds, new_tokens = result.sequences, result.seconds, result.new_tokens
        step_times = result.step_seconds
    ordered = sorted(step_times)
    return dict(
        mode=mode,
        tokens_per_second=new_tokens / seconds,
        seconds=seconds,
        new_tokens=new_tokens,
        step_ms_median=1e3 * statistics.median(ordered),
        step_ms_p90=1e3 * ordered[int(0.9 * (len(ordered) - 1))],
        steps=len(ordered),
        peak_rss_mb=peak_rss_mb(),
        sequences=sequences.tolist(),
    )


def child_step_table(workdir: Path, canvases: list[int], caches: list[int], repeats: int) -> list[dict]:
    import torch

    from dllm_trt.generation.kv_cache import StaticKVCache
    from dllm_trt.generation.sampler import sampling_noise
    from dllm_trt.generation.step import OnnxRuntimeStep

    rows = []
    for canvas in canvases:
        for kind in ("onnx", "optimized"):
            directory = workdir / f"canvas{canvas}" / kind
            step = OnnxRuntimeStep.from_artifacts(directory)
            info = step.info
            for cache_length in caches:
                cache = StaticKVCache(step.specs, 1, max(cache_length, 1), info.sliding_window, info.dtype)
                gen = torch.Generator().manual_seed(0)
                if cache_length:
                    tensors = [torch.randn(t.shape[0], t.shape[1], cache_length, t.shape[3], generator=gen)
                               for t in cache.tensors()]  # fmt: skip
                    cache.append(tensors, torch.ones(1, cache_length, dtype=torch.bool))
                canvas_ids = torch.randint(0, info.vocab_size, (1, canvas), generator=gen)
                positions = torch.arange(cache_length, cache_length + canvas)[None]
                sc = torch.zeros(1, canvas, info.hidden_size)
                times = []
                for index in range(repeats + 1):
                    noise = sampling_noise(1, canvas, info.vocab_size, gen)
                    start = time.perf_counter()
                    step.denoise_and_sample(canvas_ids, sc, positions, cache.mask(), cache.tensors(),
                                            torch.tensor(0.6), noise)  # fmt: skip
                    if index:  # the first call warms up
                        times.append(time.perf_counter() - start)
                rows.append(dict(canvas=canvas, cache=cache_length, graphs=kind, ms=1e3 * statistics.median(times)))
    return rows


def prepare(workdir: Path, canvas: int | None = None) -> Path:
    """Checkpoint, export and ort-cpu optimization of the small preset (reused when present)."""
    from dllm_trt import export, optimize
    from dllm_trt.models.presets import make_checkpoint

    base = workdir if canvas is None else workdir / f"canvas{canvas}"
    if not (base / "checkpoint" / "config.json").is_file():
        model = make_checkpoint(base / "checkpoint", "small", seed=0)
        if canvas is not None:
            model.config.canvas_length = canvas
            model.save_pretrained(base / "checkpoint")
    if not (base / "onnx" / "manifest.json").is_file():
        export.run(export.ExportOptions(base / "checkpoint", base / "onnx", parity=False, force=True))
    if not (base / "optimized" / "manifest.json").is_file():
        optimize.run(optimize.OptimizeOptions(base / "onnx", base / "optimized", "ort-cpu", parity="final", force=True))
    return base


def run_child(args: list[str]) -> object:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-small"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--canvases", default="32,64,128")
    parser.add_argument("--caches", default="0,256,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "table":
        canvases = [int(c) for c in args.canvases.split(",")]
        print(json.dumps(child_step_table(args.workdir, canvases, [int(c) for c in args.caches.split(",")],
                                          args.repeats)))  # fmt: skip
        return
    if args.child:
        print(json.dumps(child_generate(args.child, args.workdir, args.max_new_tokens, args.seed, args.batch)))
        return

    print(f"# preparing the small preset in {args.workdir} (checkpoint, export, optimize ort-cpu)", file=sys.stderr)
    prepare(args.workdir)
    common = ["--workdir", str(args.workdir), "--max-new-tokens", str(args.max_new_tokens), "--seed",
              str(args.seed), "--batch", str(args.batch)]  # fmt: skip
    results = {
        mode: run_child(["--child", mode, *common]) for mode in ("transformers", "ort-exported", "ort-optimized")
    }
    reference = results["transformers"]
    print(f"\n## generation, small preset, batch {args.batch}, {args.max_new_tokens} new tokens, seed {args.seed}, "
          f"{os.cpu_count()} CPU cores\n")  # fmt: skip
    print("| backend | tok/s | x transformers | x exported | step ms median | p90 | steps | peak RSS MB | same ids |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        same = "yes" if r["sequences"] == reference["sequences"] else "**NO**"
        speed = r["tokens_per_second"]
        print(
            f"| {mode} | {speed:.1f} | {speed / reference['tokens_per_second']:.2f} | "
            f"{speed / results['ort-exported']['tokens_per_second']:.2f} | {r['step_ms_median']:.2f} | "
            f"{r['step_ms_p90']:.2f} | {r['steps']} | {r['peak_rss_mb']:.0f} | {same} |"
        )
    if args.skip_table:
        return
    canvases = [int(c) for c in args.canvases.split(",")]
    for canvas in canvases:
        print(f"# preparing canvas {canvas}", file=sys.stderr)
        prepare(args.workdir, canvas)
    rows = run_child(["--child", "table", "--workdir", str(args.workdir), "--canvases", args.canvases,
                      "--caches", args.caches, "--repeats", str(args.repeats)])  # fmt: skip
    print("\n## denoise step latency (ms, median), batch 1, onnxruntime CPU: exported / optimized (speed-up)\n")
    caches = [int(c) for c in args.caches.split(",")]
    print("| canvas \\ cache | " + " | ".join(str(c) for c in caches) + " |")
    print("|---|" + "---|" * len(caches))
    table = {(r["canvas"], r["cache"], r["graphs"]): r["ms"] for r in rows}
    for canvas in canvases:
        cells = [
            f"{table[(canvas, c, 'onnx')]:.2f} / {table[(canvas, c, 'optimized')]:.2f} "
            f"({table[(canvas, c, 'onnx')] / table[(canvas, c, 'optimized')]:.2f}x)"
            for c in caches
        ]
        print(f"| {canvas} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
