"""Engine builds with TensorRT for RTX, ahead of time on this machine: time, peak RSS and bytes per target.

The `small` preset (or --preset) is made, exported and optimized for TensorRT once per precision;
then `dllm-trt build` runs in a child process per GPU preset (DGX Spark sm_121, RTX PRO 6000 sm_120,
RTX 4090 sm_89, RTX 3090 sm_86 by default), measured as bench_export_memory measures: wall time and
peak RSS of the child. The export's bytes (graphs and external data) are set against the
checkpoint's safetensors, and the engine's bytes against the weights of the optimized step graph
(every initializer, in its precision): one engine serves both phases, one copy of the weights.

    python bench/bench_build_engines.py [--preset small] [--precisions bf16,fp32] [--gpus dgx-spark,rtx-4090]
    python bench/bench_build_engines.py --precisions bf16,fp8,nvfp4 --gpus dgx-spark,rtx-4090   # quantized

Needs the rtx extra; no GPU. About 2 minutes for the defaults on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export_memory import run_measured  # noqa: E402


def weight_bytes(optimized: Path) -> int:
    """Every initializer of the step graph, in its stored precision."""
    import numpy as np
    import onnx
    from onnx import helper

    graph = onnx.load(str(optimized / "step.onnx"), load_external_data=False).graph
    size = {t: helper.tensor_dtype_to_np_dtype(t).itemsize for t in {i.data_type for i in graph.initializer}}
    size[onnx.TensorProto.FLOAT4E2M1] = 0.5  # two values a byte (numpy holds one a byte)
    return int(sum(size[i.data_type] * int(np.prod(i.dims)) for i in graph.initializer))


# CUDA C++ that TensorRT for RTX keeps in an engine for its just-in-time compilation on the device: one
# translation unit per generated kernel (~130-230 KB each, most of it a shared prelude), plain text.
_SOURCE_RUN = re.compile(rb"[\t\n\r\x20-\x7e]{4096,}")
_SOURCE_MARK = re.compile(rb"#include|#undef|__global__")


def jit_source_bytes(engine: Path) -> tuple[int, int]:
    """(bytes, translation units) of kernel source in an engine, found by scanning it for long runs of
    text that hold C preprocessor lines or kernels; no TensorRT API reports it. An estimate from below:
    a unit split by a non-text byte is counted in its parts, parts shorter than 4 KB not at all."""
    runs = [m.group() for m in _SOURCE_RUN.finditer(engine.read_bytes())]
    source = [r for r in runs if _SOURCE_MARK.search(r)]
    return sum(map(len, source)), len(source)


def directory_bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--gpus", default="dgx-spark,rtx-pro-6000,rtx-4090,rtx-3090")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-build"))
    args = parser.parse_args()
    cli = shutil.which("dllm-trt") or str(Path(sys.executable).parent / "dllm-trt")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs = work / "logs"
    logs.mkdir()
    stages = []  # (what, seconds, peak RSS) of the steps before the builds
    for argv in (["make-tiny", work / "ckpt", "--preset", args.preset], ["export", work / "ckpt", "-o", work / "onnx",
                                                                         "--no-parity"]):  # fmt: skip
        measured = run_measured([cli, *map(str, argv)], logs / f"{argv[0]}.log")
        if measured.returncode:
            print(f"{argv[0]} failed: see {logs / (argv[0] + '.log')}")
            return 1
        stages.append((argv[0], measured.seconds, measured.peak_rss))
    checkpoint = directory_bytes(work / "ckpt", "*.safetensors")
    export = directory_bytes(work / "onnx", "*.onnx") + directory_bytes(work / "onnx", "*.data")
    precisions = args.precisions.split(",")
    baseline = precisions[0]  # the engines are set against this precision's, per GPU
    rows, sizes, weights_of = [], {}, {}  # sizes: (precision, gpu) -> (engine bytes, JIT source bytes)
    for precision in precisions:
        optimized = work / f"trt-{precision}"
        argv = [cli, "optimize", str(work / "onnx"), "--target", "trt", "--precision", precision, "-o", str(optimized),
                "--parity", "none"]  # fmt: skip
        measured = run_measured(argv, logs / f"optimize-{precision}.log")
        if measured.returncode:
            print(f"optimize {precision} failed: see the log")
            return 1
        stages.append((f"optimize {precision}", measured.seconds, measured.peak_rss))
        weights = weights_of[precision] = weight_bytes(optimized)
        for gpu in args.gpus.split(","):
            out = work / f"engines-{precision}-{gpu}"
            measured = run_measured([cli, "build", str(optimized), "--gpu", gpu, "-o", str(out)],
                                    logs / f"build-{precision}-{gpu}.log")  # fmt: skip
            if measured.returncode:
                rows.append((precision, gpu, "failed", *[""] * 9))
                continue
            info = json.loads((out / "build_info.json").read_text())
            engine = info["engines"]["step"]
            source, units = jit_source_bytes(out / engine["file"])
            sizes[precision, gpu] = (engine["bytes"], source)
            base = sizes.get((baseline, gpu))
            versus = f"{engine['bytes'] / base[0]:.2f}" if base else ""
            versus_less = f"{(engine['bytes'] - source) / (base[0] - base[1]):.2f}" if base else ""
            rows.append((precision, gpu, f"sm_{''.join(map(str, info['gpu']['compute_capability']))}",
                         f"{measured.seconds:.1f}", f"{measured.peak_rss / 2**20:.0f}",
                         f"{engine['bytes'] / 2**20:.1f}", f"{engine['bytes'] / weights:.2f}",
                         f"{source / 2**20:.1f} ({units})", versus, versus_less,
                         str(len(info["graph_profiles"]["step"])), str(engine["fused_attention_kernels"])))  # fmt: skip
    print(f"\n**TensorRT for RTX builds of the {args.preset} preset on this machine (no GPU)**\n")
    print(f"JIT source: CUDA C++ kept in the engine for compilation on the device (kernels in brackets), found by "
          f"a byte scan; x {baseline}: engine bytes against the {baseline} engine's for the same GPU, with and "
          "without it.\n")  # fmt: skip
    print(f"| precision | GPU | target | build s | peak RSS MB | engine MB | x weights | JIT source MB | "
          f"x {baseline} | x {baseline} less source | profiles | fused MHA |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for precision, weights in weights_of.items():
        print(f"{precision} weights of the step graph: {weights / 2**20:.1f} MB")
    for what, seconds, rss in stages:
        print(f"{what}: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MB")
    print(f"export: {export / 2**20:.1f} MB of graphs and external data for a {checkpoint / 2**20:.1f} MB checkpoint "
          f"({export / checkpoint:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
