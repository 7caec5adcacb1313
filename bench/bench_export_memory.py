"""Peak memory of the export on full-width checkpoints of 1, 2 and 4 layers: it must not grow with the layers.

For each layer count N: `dllm-trt make-tiny CKPT --preset full-width --layers N` (the released widths,
bfloat16, written streamed), then `dllm-trt export CKPT -o OUT --no-parity`, each in a child process
whose peak RSS is measured two ways: the kernel's ru_maxrss of the child (what /usr/bin/time -v
reports) and the sum over the child and its children sampled every 50 ms (psutil). Prints a table and
checks the acceptance: the export's peak stays within 1.5x of the 1-layer peak, and below the
checkpoint size for the largest checkpoint. Scratch files are deleted as soon as each N is done.

    python bench/bench_export_memory.py [--layers 1,2,4] [--workdir /tmp/dllm-bench] [--parity]

Takes about 10 minutes and 25 GB of scratch disk for 1, 2, 4 layers on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Measured:
    peak_rss: int  # bytes, the larger of the two measurements
    seconds: float
    returncode: int


def run_measured(argv: list[str], log: Path) -> Measured:
    """Run `argv`, sampling the RSS of it and its children; the peak and wall time."""
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        process = psutil.Process(child.pid)
        sampled = 0
        while True:
            # wait4 reaps the child itself, so that its own rusage (ru_maxrss) comes back with it
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [process, *process.children(recursive=True)]
                sampled = max(sampled, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    kernel = usage.ru_maxrss * 1024  # KiB on Linux: the kernel's exact peak, what /usr/bin/time -v reports
    return Measured(max(sampled, kernel), seconds, os.waitstatus_to_exitcode(status))


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gb(count: float) -> str:
    return f"{count / 2**30:.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,2,4", help="comma-separated layer counts (default 1,2,4)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-bench-export-memory"))
    parser.add_argument("--parity", action="store_true", help="also measure parity (needs a float32 export)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    args = parser.parse_args()
    cli = shutil.which("dllm-trt") or str(Path(sys.executable).parent / "dllm-trt")
    layer_counts = [int(n) for n in args.layers.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in layer_counts:
        ckpt, out = args.workdir / f"full-width-{layers}", args.workdir / f"export-{layers}"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        make = run_measured(
            [cli, "make-tiny", str(ckpt), "--preset", "full-width", "--layers", str(layers)],
            args.workdir / f"make-{layers}.log",
        )
        if make.returncode:
            print((args.workdir / f"make-{layers}.log").read_text()[-2000:], file=sys.stderr)
            return 2
        export_argv = [cli, "export", str(ckpt), "-o", str(out)]
        export_argv += ["--dtype", "float32"] if args.parity else ["--no-parity"]
        export = run_measured(export_argv, args.workdir / f"export-{layers}.log")
        if export.returncode:
            print((args.workdir / f"export-{layers}.log").read_text()[-2000:], file=sys.stderr)
            return 2
        rows.append((layers, directory_bytes(ckpt), make, directory_bytes(out), export))
        print(
            f"{layers} layer(s): checkpoint {gb(rows[-1][1])} written with peak {gb(make.peak_rss)}; "
            f"export {gb(rows[-1][3])} with peak {gb(export.peak_rss)} in {export.seconds:.0f} s",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    base = rows[0][4].peak_rss
    print()
    print(
        "| layers | checkpoint | make-tiny peak RSS | make-tiny time | export size | export peak RSS | vs first "
        "| export time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, ckpt_bytes, make, out_bytes, export in rows:
        print(
            f"| {layers} | {gb(ckpt_bytes)} | {gb(make.peak_rss)} | {make.seconds:.0f} s | {gb(out_bytes)} | "
            f"{gb(export.peak_rss)} | {export.peak_rss / base:.2f}x | {export.seconds:.0f} s |"
        )
    largest = rows[-1]
    bounded = all(r[4].peak_rss <= 1.5 * base for r in rows)
    below = largest[4].peak_rss < largest[1]
    print()
    print(f"peak within 1.5x of the {rows[0][0]}-layer peak: {'yes' if bounded else 'NO'}")
    print(f"peak below the {largest[0]}-layer checkpoint size ({gb(largest[1])}): {'yes' if below else 'NO'}")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if bounded and below else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
