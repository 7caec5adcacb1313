"""Engine builds with TensorRT for RTX, ahead of time on this machine: time, peak RSS and bytes per target.

The `small` preset (or --preset) is made, exported and optimized for TensorRT once per precision;
then `dllm-trt build` runs in a child process per GPU preset (DGX Spark sm_121, RTX PRO 6000 sm_120,
RTX 4090 sm_89, RTX 3090 sm_86 by default), measured as bench_export_memory measures: wall time and
peak RSS of the child. Engine bytes are set against the bf16 (or fp32) weights of the optimized
graphs: each step is its own engine holding every weight it uses (the one-engine issue's figure).

    python bench/bench_build_engines.py [--preset small] [--precisions bf16,fp32] [--gpus dgx-spark,rtx-4090]

Needs the rtx extra; no GPU. About 2 minutes for the defaults on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export_memory import run_measured  # noqa: E402


def weight_bytes(optimized: Path) -> int:
    manifest = json.loads((optimized / "manifest.json").read_text())
    return sum(e["bytes"] for g in manifest["graphs"].values() for e in g["external_data"])


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
    for argv in (["make-tiny", work / "ckpt", "--preset", args.preset], ["export", work / "ckpt", "-o", work / "onnx",
                                                                         "--no-parity"]):  # fmt: skip
        if run_measured([cli, *map(str, argv)], logs / f"{argv[0]}.log").returncode:
            print(f"{argv[0]} failed: see {logs / (argv[0] + '.log')}")
            return 1
    rows = []
    for precision in args.precisions.split(","):
        optimized = work / f"trt-{precision}"
        argv = [cli, "optimize", str(work / "onnx"), "--target", "trt", "--precision", precision, "-o", str(optimized),
                "--parity", "none"]  # fmt: skip
        if run_measured(argv, logs / f"optimize-{precision}.log").returncode:
            print(f"optimize {precision} failed: see the log")
            return 1
        weights = weight_bytes(optimized)
        for gpu in args.gpus.split(","):
            out = work / f"engines-{precision}-{gpu}"
            measured = run_measured([cli, "build", str(optimized), "--gpu", gpu, "-o", str(out)],
                                    logs / f"build-{precision}-{gpu}.log")  # fmt: skip
            if measured.returncode:
                rows.append((precision, gpu, "failed", "", "", "", "", ""))
                continue
            info = json.loads((out / "build_info.json").read_text())
            engines = info["engines"]
            total = sum(e["bytes"] for e in engines.values())
            fused = sum(e["fused_attention_kernels"] for e in engines.values())
            rows.append((precision, gpu, f"sm_{''.join(map(str, info['gpu']['compute_capability']))}",
                         f"{measured.seconds:.1f}", f"{measured.peak_rss / 2**20:.0f}",
                         " + ".join(f"{e['bytes'] / 2**20:.1f}" for e in engines.values()),
                         f"{total / weights:.2f}", str(fused)))  # fmt: skip
    print(f"\n**TensorRT for RTX builds of the {args.preset} preset on this machine (no GPU)**\n")
    print("| precision | GPU | target | build s | peak RSS MB | engines MB (enc+den) | x weights | fused MHA |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for precision in args.precisions.split(","):
        print(f"{precision} weights of both graphs: {weight_bytes(work / f'trt-{precision}') / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
