"""Time and peak memory of exporting the released-width vision tower: bounded, like the text export.

`dllm-trt make-tiny CKPT --preset full-width-vision --layers N` writes the released text widths (N layers)
with the released tower's widths (27 layers, hidden 1152, 16 heads of 72, intermediate 4304: about 570M
parameters, 1.1 GB in bfloat16), streamed; `dllm-trt export CKPT -o OUT --no-parity --max-soft-tokens ...`
writes the step, the self-conditioning graph and one vision graph per count over one copy of the tower's
weights. The same text checkpoint without a tower (`--preset full-width`) is exported in the same run as
the baseline. Each command runs in a child process whose peak RSS is measured as bench_export_memory.py
measures it (the kernel's ru_maxrss and the sampled process tree, the larger of the two).

    python bench/bench_vision_export.py [--layers 1] [--max-soft-tokens 280] [--workdir DIR] [--keep]

Prints a table: checkpoint and export bytes, export time and peak RSS, and the vision export against the
text-only one (time and peak ratios). About 10 minutes and 10 GB of scratch disk on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench_export_memory import directory_bytes, gb, run_measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="text layers of both checkpoints (default 1)")
    parser.add_argument("--max-soft-tokens", default="280", help="the vision graphs' counts (default 280)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-vision-export"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    args = parser.parse_args()
    cli = shutil.which("dllm-trt") or str(Path(sys.executable).parent / "dllm-trt")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for preset in ("full-width", "full-width-vision"):
        ckpt, out = args.workdir / f"{preset}-ckpt", args.workdir / f"{preset}-onnx"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        make = run_measured([cli, "make-tiny", str(ckpt), "--preset", preset, "--layers", str(args.layers)],
                            args.workdir / f"{preset}-make.log")  # fmt: skip
        if make.returncode:
            print((args.workdir / f"{preset}-make.log").read_text()[-2000:], file=sys.stderr)
            return 2
        argv = [cli, "export", str(ckpt), "-o", str(out), "--no-parity", "--max-soft-tokens", args.max_soft_tokens]
        export = run_measured(argv, args.workdir / f"{preset}-export.log")
        if export.returncode:
            print((args.workdir / f"{preset}-export.log").read_text()[-2000:], file=sys.stderr)
            return 2
        graphs = sorted(p.name for p in out.glob("*.onnx"))
        rows[preset] = (directory_bytes(ckpt), directory_bytes(out), export, graphs)
        print(f"{preset}: checkpoint {gb(rows[preset][0])}, export {gb(rows[preset][1])} ({', '.join(graphs)}) "
              f"in {export.seconds:.0f} s, peak {gb(export.peak_rss)}", flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    base = rows["full-width"][2]
    print()
    print("| checkpoint | checkpoint size | export size | graphs | export time | x text-only | peak RSS "
          "| x text-only |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for preset, (ckpt_bytes, out_bytes, export, graphs) in rows.items():
        print(f"| {preset} ({args.layers} text layer(s)) | {gb(ckpt_bytes)} | {gb(out_bytes)} | {', '.join(graphs)} | "
              f"{export.seconds:.0f} s | {export.seconds / base.seconds:.2f} | {gb(export.peak_rss)} | "
              f"{export.peak_rss / base.peak_rss:.2f} |")  # fmt: skip
    tower = rows["full-width-vision"][0] - rows["full-width"][0]
    vision = rows["full-width-vision"][2]
    print()
    print(f"the tower adds {gb(tower)} of weights; the export's peak grows by {gb(vision.peak_rss - base.peak_rss)}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if vision.peak_rss < base.peak_rss + tower else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
