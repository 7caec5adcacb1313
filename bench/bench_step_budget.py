"""Where one denoise step's time goes on this CPU, against the time a 3x speed-up over transformers allows.

    python bench/bench_step_budget.py [--workdir DIR] [--max-new-tokens 128] [--seed 0]

The `small` preset, prepared as bench_generation.py does (reused from its work directory), batch 1:

  - transformers `generate()` and the loop over the optimized graphs (ort-optimized), each timed
    as bench_generation.py times it: the whole generation divided by its denoise calls (the all-in
    time of one step: forward, sampling, noise); a third of transformers' is what a step may take
    at 3x;
  - one step's sampling noise (B*C*V Exp(1) values from torch's generator): torch's own draw, the
    numpy draw the loop uses, and the Mersenne Twister's 32-bit outputs alone (two per value, one
    after another: the part of the draw no thread can share);
  - the optimized denoiser alone (no noise being drawn beside it) on inputs recorded from one
    more generation: its median time, and where it goes, from an onnxruntime profile of the same calls
    grouped by what the nodes compute (each group's share of the profiled kernel time, applied to
    the unprofiled median).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from bench_generation import PROMPTS, child_generate, prepare  # bench/ is the script's directory, first on sys.path

from dllm_trt.contract import STEP_FILE


def all_in_step_ms(mode: str, workdir: Path, max_new_tokens: int, seed: int) -> tuple[float, int]:
    """bench_generation's timed generation (after its warm-up), per denoise step: (ms, steps)."""
    run = child_generate(mode, workdir, max_new_tokens, seed, batch=1)
    return 1e3 * run["seconds"] / run["steps"], run["steps"]


class RecordingSession:
    """An onnxruntime session that keeps copies of the feeds of every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.feeds = session, []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.session, name)

    def run(self, names, feeds, *args):  # noqa: ANN001, ANN002, ANN201
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.session.run(names, feeds, *args)


def recorded_denoiser_feeds(workdir: Path, max_new_tokens: int, seed: int) -> list[dict]:
    """The optimized step's feeds of every denoise call of one generation (untimed)."""
    from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
    from dllm_trt.generation.step import OnnxRuntimeStep

    directory = workdir / "optimized"
    step = OnnxRuntimeStep.from_artifacts(directory)
    settings = GenerationSettings.from_generation_config(
        json.loads((directory / "generation_config.json").read_text()), max_new_tokens=max_new_tokens
    )
    recording = step.sessions[STEP_FILE] = RecordingSession(step.sessions[STEP_FILE])
    generate(step, settings, *left_pad(PROMPTS, 0), seed=seed)
    return [f for f in recording.feeds if f["self_conditioning"].shape[1] > 0]  # rows: a denoise call


def median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def noise_ms(count: int) -> dict[str, float]:
    from dllm_trt.generation import exponential_noise

    generator = torch.Generator().manual_seed(0)
    twister = np.random.Generator(np.random.MT19937(0))
    return {
        "torch exponential_": median_ms(lambda: torch.empty(count).exponential_(1, generator=generator), 10),
        "numpy (the loop's draw)": median_ms(lambda: exponential_noise.exponential(generator, count), 10),
        "Mersenne Twister outputs alone": median_ms(
            lambda: twister.integers(0, 1 << 32, size=2 * count, dtype=np.uint32), 10
        ),
    }


def group_of(event: dict, vocab: int) -> str:
    args = event["args"]
    op, name = args["op_name"], event["name"]
    shapes = [dims for key in ("input_type_shape", "output_type_shape") for entry in args.get(key, [])
              for dims in entry.values()]  # fmt: skip
    touches_vocab = any(vocab in dims for dims in shapes)
    if "RoutedMoE" in name:
        return "MoE experts: MatMuls" if op == "MatMul" else "MoE experts: routing, gather, GeLU, sum"
    if op in ("MatMul", "FusedMatMul", "Gemm") and touches_vocab:
        return "LM head + self-conditioning embedding"
    if touches_vocab:
        return "sampling head over the vocabulary"
    if op in ("MatMul", "FusedMatMul", "Gemm"):
        return "attention projections, dense MLP, router"
    if op in ("Attention", "RotaryEmbedding"):
        return "attention + RoPE kernels"
    if op == "RMSNormalization":
        return "RMSNorm"
    return "the rest (element-wise, shapes)"


def denoiser_breakdown(directory: Path, feeds: list[dict], vocab: int) -> tuple[float, dict[str, tuple[float, int]]]:
    from dllm_trt.generation.ort_session import open_session

    session = open_session(directory / STEP_FILE, spin=True)  # as the loop opens it
    names = [o.name for o in session.get_outputs()]
    calls = feeds[:: max(1, len(feeds) // 12)]
    wall = statistics.median(median_ms(lambda f=f: session.run(names, f), 5) for f in calls)

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.log_severity_level = 3
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="dllm-bench-profile-")) / "step")
    profiled = ort.InferenceSession(str(directory / STEP_FILE), options)
    for f in calls:
        profiled.run(names, f)  # warm-up
    for f in calls:
        profiled.run(names, f)
    trace_file = Path(profiled.end_profiling())
    trace = json.loads(trace_file.read_text())
    shutil.rmtree(trace_file.parent)
    nodes = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    nodes = nodes[len(nodes) // 2 :]  # the second pass only
    time_of, count_of = defaultdict(float), defaultdict(int)
    for event in nodes:
        group = group_of(event, vocab)
        time_of[group] += event["dur"]
        count_of[group] += 1
    total = sum(time_of.values())
    return wall, {g: (wall * t / total, count_of[g] // len(calls)) for g, t in time_of.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-small"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"# preparing the small preset in {args.workdir}", file=sys.stderr)
    prepare(args.workdir)
    config = json.loads((args.workdir / "checkpoint" / "config.json").read_text())
    vocab, canvas = config["text_config"]["vocab_size"], config["canvas_length"]

    print("# transformers generate()", file=sys.stderr)
    reference, reference_calls = all_in_step_ms("transformers", args.workdir, args.max_new_tokens, args.seed)
    print("# the loop over the optimized graphs", file=sys.stderr)
    loop, loop_calls = all_in_step_ms("ort-optimized", args.workdir, args.max_new_tokens, args.seed)
    feeds = recorded_denoiser_feeds(args.workdir, args.max_new_tokens, args.seed)
    print("# the noise, the denoiser alone", file=sys.stderr)
    noise = noise_ms(canvas * vocab)
    wall, groups = denoiser_breakdown(args.workdir / "optimized", feeds, vocab)

    budget = reference / 3
    print(f"\n## one denoise step, small preset, batch 1, canvas {canvas}, vocab {vocab}, "
          f"{args.max_new_tokens} new tokens\n")  # fmt: skip
    print("| what | ms per step |")
    print("|---|---|")
    print(f"| transformers generate(), all in ({reference_calls} steps) | {reference:.2f} |")
    print(f"| **3x transformers: the budget** | **{budget:.2f}** |")
    print(f"| ort-optimized loop, all in ({loop_calls} steps) | {loop:.2f} ({reference / loop:.2f}x) |")
    print(f"| optimized denoiser alone, both cores | {wall:.2f} |")
    for what, ms in noise.items():
        print(f"| noise, {canvas} x {vocab} Exp(1): {what} | {ms:.2f} |")
    print("\n## the optimized denoiser alone, by what its nodes compute (onnxruntime profile shares)\n")
    print("| nodes | ms | count |")
    print("|---|---|---|")
    for group, (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {group} | {ms:.2f} | {count} |")
    twister = noise["Mersenne Twister outputs alone"]
    print(f"\nWith these graphs a step takes at least the denoiser alone plus the twister's share of the two "
          f"cores: {wall:.2f} + {twister:.2f} / 2 = {wall + twister / 2:.2f} ms, "
          f"{(wall + twister / 2) / budget:.2f}x the 3x budget of {budget:.2f} ms.")  # fmt: skip


if __name__ == "__main__":
    main()
