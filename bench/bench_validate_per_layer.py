"""Peak memory and time of `validate --per-layer` on full-width checkpoints: memory must not grow with depth.

For each layer count N: `dllm-trt make-tiny CKPT --preset full-width --layers N` (the released widths,
bfloat16), `dllm-trt export CKPT -o OUT --no-parity`, then `dllm-trt validate OUT --reference CKPT
--per-layer --canvas C` in a child process whose peak RSS is measured (bench_export_memory.run_measured:
ru_maxrss and a 50 ms psutil sample of the process tree). Then one layer's weights of the export are
perturbed (its input norm scaled by 1.05, bytes patched in a copy of the external data) and validated
again: it must fail and name that layer. Prints a table; checks that the 4-layer peak is within 1.25x
of the 2-layer peak.

    python bench/bench_validate_per_layer.py [--layers 2,4] [--canvas 32] [--workdir /tmp/dllm-bench-pl]

About 15 minutes and 25 GB of scratch disk for 2 and 4 layers on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from bench_export_memory import run_measured

CLI = [sys.executable, "-m", "dllm_trt.cli"]


def perturb(src: Path, dst: Path, prefix: str, factor: float) -> str:
    """A copy of the export in `dst` with the initializer named `prefix...` scaled by `factor` (bytes patched)."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "step.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name.startswith(prefix))
    info = {e.key: e.value for e in init.external_data}
    dtype = {onnx.TensorProto.BFLOAT16: ml_dtypes.bfloat16, onnx.TensorProto.FLOAT: np.float32}[init.data_type]
    with (dst / info["location"]).open("r+b") as handle:
        handle.seek(int(info["offset"]))
        values = np.frombuffer(handle.read(int(info["length"])), dtype=dtype)
        handle.seek(int(info["offset"]))
        handle.write((values.astype(np.float32) * factor).astype(dtype).tobytes())
    return init.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-pl"))
    parser.add_argument("--reuse", action="store_true", help="keep a workdir's checkpoint and export")
    args = parser.parse_args()
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        work = args.workdir / f"L{layers}"
        ckpt, out, bad = work / "ckpt", work / "onnx", work / "onnx-perturbed"
        reuse = args.reuse and (out / "manifest.json").is_file()
        if not reuse:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        shutil.rmtree(bad, ignore_errors=True)
        for argv in (
            ()
            if reuse
            else (
                [*CLI, "make-tiny", str(ckpt), "--preset", "full-width", "--layers", str(layers)],
                [*CLI, "export", str(ckpt), "-o", str(out), "--no-parity"],
            )
        ):
            made = run_measured(argv, work / "prepare.log")
            if made.returncode:
                print((work / "prepare.log").read_text()[-2000:])
                return 1
        target = layers // 2
        name = perturb(out, bad, f"model.decoder.layers.{target}.input_layernorm.weight", 1.05)
        for label, directory in (("honest", out), (f"layer {target} input norm x1.05", bad)):
            report = work / f"report-{directory.name}"
            argv = [*CLI, "validate", str(directory), "--reference", str(ckpt), "--per-layer", "--canvas",
                    str(args.canvas), "--report", str(report)]  # fmt: skip
            measured = run_measured(argv, work / f"validate-{directory.name}.log")
            result = json.loads((report / "report.json").read_text())["per_layer"]
            rows.append((layers, label, measured, result))
            first = f"{result['first_divergent_layer']} ({result['first_divergent_block']})"
            print(f"{layers} layers, {label}: exit {measured.returncode}, peak RSS {measured.peak_rss / 2**30:.2f} "
                  f"GiB, {measured.seconds:.0f} s, first divergent layer {first}", flush=True)  # fmt: skip
        print(f"  perturbed {name}", flush=True)
        shutil.rmtree(bad)
        if not args.reuse:
            shutil.rmtree(ckpt)
            shutil.rmtree(out)
    print("\n| layers | artifact | exit | peak RSS | time | first divergent layer (block) |\n|---|---|---|---|---|---|")
    for layers, label, measured, result in rows:
        first = f"{result['first_divergent_layer']} ({result['first_divergent_block']})"
        print(f"| {layers} | {label} | {measured.returncode} | {measured.peak_rss / 2**30:.2f} GiB | "
              f"{measured.seconds:.0f} s | {first} |")  # fmt: skip
    honest = {layers: m.peak_rss for layers, label, m, _ in rows if label == "honest"}
    if len(honest) >= 2:
        low, high = min(honest), max(honest)
        ratio = honest[high] / honest[low]
        print(f"\npeak RSS at {high} layers / at {low} layers: {ratio:.2f}x (acceptance: <= 1.25x)")
        return 0 if ratio <= 1.25 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
