"""`dllm-trt serve` under load: throughput and latency at 1, 4 and 16 concurrent streams, on this machine.

    python bench/bench_serve.py [--artifacts DIR] [--requests 16] [--max-tokens 64] [--levels 1,4,16]
                                [--rounds 3] [--threads 0] [--backend onnxruntime] [--device cpu]

Serves the trained checkpoint's optimized graphs (made in a temporary directory unless --artifacts) with
`dllm-trt serve` in its own process, as a user would, and sends the same requests (distinct prompts and
seeds, streamed through the official `openai` client) at each concurrency level: 1 is one-at-a-time, the
reference; 4 and 16 keep that many streams open. The levels take turns, `--rounds` times, so that a
machine whose load drifts weighs on every level alike; each figure is the median over the rounds.
Prints per level: tokens/s and its ratio to one-at-a-time, tokens per CPU-second of the server process
(less sensitive to other processes than wall time), latency to the first committed canvas and to the
last (median, p90), the mean requests per denoise call (from the server's own metrics), and whether
every text equals its one-at-a-time text. One more line: the loop's `generate()` one request at a time
in this process, no server, in the same rounds (what the fixed-layout cache and HTTP cost).
On a GPU: --backend torch --device cuda (not run here).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "src" / "dllm_trt" / "assets" / "pycode-tiny"
PROMPTS = ("def fibonacci(n):", "class Stack:", "import os\n\n\ndef read_lines(path):", "for i in range(10):",
           "def parse(text):", "class Node:", "with open(path) as f:", "if __name__ == '__main__':")  # fmt: skip


def make_artifacts(workdir: Path) -> Path:
    from dllm_trt import export, optimize

    export.run(export.ExportOptions(CHECKPOINT, workdir / "onnx", parity=False, quiet=True))
    optimize.run(optimize.OptimizeOptions(workdir / "onnx", workdir / "optimized", "ort-cpu", parity="none",
                                          quiet=True))  # fmt: skip
    return workdir / "optimized"


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start_server(args: argparse.Namespace, artifacts: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "dllm_trt.cli", "serve", str(artifacts), "--port", str(port), "--backend",
               args.backend, "--device", args.device, "--max-batch", str(max(args.levels)), "--threads",
               str(args.threads)]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server was not ready in 300 s")


def one_request(client, model: str, index: int, max_tokens: int) -> dict:  # noqa: ANN001
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    stream = client.completions.create(model=model, prompt=PROMPTS[index % len(PROMPTS)], seed=index, stream=True,
                                       max_tokens=max_tokens, stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return dict(text="".join(pieces), tokens=tokens, first=first, total=time.perf_counter() - start)


def run_level(client, url: str, model: str, streams: int, args: argparse.Namespace, server) -> dict:  # noqa: ANN001
    rows_sum = metric(url, 'dllm_trt_step_rows_sum{phase="denoise"}')
    rows_count = metric(url, 'dllm_trt_step_rows_count{phase="denoise"}')
    cpu = sum(server.cpu_times()[:2])
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda i: one_request(client, model, i, args.max_tokens), range(args.requests)))
    wall = time.perf_counter() - start
    cpu = sum(server.cpu_times()[:2]) - cpu
    calls = metric(url, 'dllm_trt_step_rows_count{phase="denoise"}') - rows_count
    rows = metric(url, 'dllm_trt_step_rows_sum{phase="denoise"}') - rows_sum

    def quantiles(key: str) -> tuple[float, float]:
        values = sorted(r[key] for r in results)
        return statistics.median(values), values[min(len(values) - 1, int(0.9 * len(values)))]

    return dict(
        wall=wall, cpu=cpu, tokens=sum(r["tokens"] for r in results), texts=[r["text"] for r in results],
        first=quantiles("first"), total=quantiles("total"), rows_per_call=rows / calls if calls else 0.0,
    )  # fmt: skip


class LoopReference:
    """The loop itself (generate()), one request at a time in this process: no server, no fixed-layout cache."""

    def __init__(self, artifacts: Path, max_tokens: int) -> None:
        from dllm_trt.generation.backends import open_step
        from dllm_trt.generation.loop import GenerationSettings
        from dllm_trt.generation.tokenizer import generation_config, load_tokenizer

        self.step, self.tokenizer = open_step(artifacts, "onnxruntime"), load_tokenizer(artifacts)
        self.settings = GenerationSettings.from_generation_config(generation_config(artifacts),
                                                                  max_new_tokens=max_tokens)  # fmt: skip

    def run(self, requests: int) -> dict:
        import torch

        from dllm_trt.generation.loop import generate

        start, tokens = time.perf_counter(), 0
        for index in range(requests):
            ids = torch.tensor([self.tokenizer(PROMPTS[index % len(PROMPTS)])["input_ids"]])
            tokens += generate(self.step, self.settings, ids, seed=index).new_tokens
        return dict(wall=time.perf_counter() - start, tokens=tokens)


def report(args: argparse.Namespace, runs: dict[int, list[dict]], loops: list[dict]) -> None:
    def median(streams: int, key) -> float:  # noqa: ANN001
        return statistics.median(key(run) for run in runs[streams])

    def rate(run: dict) -> float:
        return run["tokens"] / run["wall"]

    def per_cpu(run: dict) -> float:
        return run["tokens"] / run["cpu"]

    base = args.levels[0]
    reference = runs[base][0]["texts"]
    threads = args.threads or "one per core"
    print(f"\n**serve, trained pycode-tiny, ort-cpu graphs, {args.backend} on {args.device} ({threads} onnxruntime "
          f"threads), {args.requests} requests of {args.max_tokens} tokens per level, median of {args.rounds} "
          "rounds**\n")  # fmt: skip
    print("| concurrent streams | tok/s | x one-at-a-time | tok per server CPU-s | x | first canvas s (median / p90) "
          "| whole request s (median / p90) | requests per denoise call | texts = one-at-a-time |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for streams in args.levels:
        tps, cps = median(streams, rate), median(streams, per_cpu)
        same = "yes" if all(run["texts"] == reference for run in runs[streams]) else "**NO**"
        print(f"| {streams} | {tps:.1f} | {tps / median(base, rate):.2f} | {cps:.1f} | "
              f"{cps / median(base, per_cpu):.2f} | "
              f"{median(streams, lambda r: r['first'][0]):.2f} / {median(streams, lambda r: r['first'][1]):.2f} | "
              f"{median(streams, lambda r: r['total'][0]):.2f} / {median(streams, lambda r: r['total'][1]):.2f} | "
              f"{median(streams, lambda r: r['rows_per_call']):.1f} | {same} |")  # fmt: skip
    print("\nper round, tok/s: " + "; ".join(f"{s} streams " + ", ".join(f"{rate(r):.1f}" for r in runs[s])
                                            for s in args.levels))  # fmt: skip
    loop_rate = statistics.median(rate(run) for run in loops)
    print(f"the loop (generate()), one at a time in this process, no server, in the same rounds: {loop_rate:.1f} "
          f"tok/s ({loop_rate / median(base, rate):.2f}x the server one-at-a-time)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, help="optimized graphs to serve (default: made from the checkpoint)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,16", help="concurrent streams per level; 1 first (the reference)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every level (default 3); medians reported")
    parser.add_argument("--threads", type=int, default=0, help="the server's onnxruntime threads (0: one per core)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    import openai
    import psutil

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        artifacts = args.artifacts or make_artifacts(Path(tmp))
        server, url = start_server(args, artifacts)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            one_request(client, model, 0, 32)  # warm-up: sessions, allocator, first-call costs
            process = psutil.Process(server.pid)
            runs: dict[int, list[dict]] = {s: [] for s in args.levels}
            loop, loops = LoopReference(artifacts, args.max_tokens), []
            for _ in range(args.rounds):
                for streams in args.levels:
                    runs[streams].append(run_level(client, url, model, streams, args, process))
                loops.append(loop.run(args.requests))
        finally:
            server.terminate()
            server.wait(60)
    report(args, runs, loops)


if __name__ == "__main__":
    main()
