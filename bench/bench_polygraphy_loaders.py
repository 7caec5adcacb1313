"""dllm-trt's engine build (trt/engine.py) against Polygraphy's loaders on the same graph, TensorRT for RTX, this CPU.

Both paths in one process, alternated, each `--repeats` times: dllm-trt's parse_network + allow_decomposition +
build_serialized, and Polygraphy's NetworkFromOnnxPath(strongly_typed) + PostprocessNetwork(allow_decomposition) +
CreateConfigRTX(compute_capabilities, profiles, opt level, DETAILED) + EngineBytesFromNetwork, with the DllmMoE
plugin registered as `dllm-trt build` registers it. Printed per path: build seconds (median), engine bytes, the
plugin's stored kernel sets, network layers, and the builder's DETAILED layer list as each path can read it.

    python bench/bench_polygraphy_loaders.py OPTIMIZED [--gpu dgx-spark] [--repeats 2]

OPTIMIZED: a directory of `dllm-trt optimize --target trt`. Needs the rtx extra; no GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("optimized", type=Path)
    parser.add_argument("--gpu", default="dgx-spark", help="a TensorRT-for-RTX GPU preset")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"  # read when polygraphy is first imported
    os.environ.pop("TRITON_INTERPRET", None)

    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessNetwork, Profile

    from dllm_trt.contract import STEP_FILE
    from dllm_trt.engines.stage import BuildOptions, plan_build
    from dllm_trt.trt import engine as trt_engine
    from dllm_trt.trt.gpu_presets import get_preset
    from dllm_trt.trt.moe_plugin import KERNELS_MAGIC, compile_for_graphs, register_moe_plugin
    from dllm_trt.trt.trt_library import load_library

    preset = get_preset(args.gpu)
    lib = load_library(preset.library)
    plan = plan_build(BuildOptions(args.optimized, args.optimized / "unused", args.gpu))
    profiles = list(plan["graphs"]["step"]["profiles"].values())
    path = args.optimized / STEP_FILE
    register_moe_plugin(lib.trt, arch=preset.arch)
    compile_for_graphs([path], preset.arch)  # both paths then find the kernels compiled (Triton's cache)

    def ours() -> dict:
        parsed = trt_engine.parse_network(lib, path)
        trt_engine.allow_decomposition(lib, parsed[1])
        layers = parsed[1].num_layers
        engine, listed = trt_engine.build_serialized(lib, parsed, profiles, preset.compute_capability, 3, None)
        return dict(engine=engine, network_layers=layers, engine_layers=len(listed))

    def polygraphy() -> dict:
        counted = {}

        def decompose(network):  # noqa: ANN001, ANN202 (what dllm-trt does after parsing)
            trt_engine.allow_decomposition(lib, network)
            counted["layers"] = network.num_layers
            return network

        network = PostprocessNetwork(NetworkFromOnnxPath(str(path), strongly_typed=True), decompose)
        shapes = []
        for profile in profiles:
            shaped = Profile()
            for name, (lo, opt, hi) in profile.items():
                shaped.add(name, lo, opt, hi)
            shapes.append(shaped)
        config = CreateConfigRTX(
            compute_capabilities=[preset.compute_capability], profiles=shapes, builder_optimization_level=3,
            profiling_verbosity=lib.trt.ProfilingVerbosity.DETAILED,
        )  # fmt: skip
        engine = bytes(EngineBytesFromNetwork(network, config=config)())
        # its TensorRT logger is Polygraphy's process-wide one: the layer list goes to Polygraphy's console
        return dict(engine=engine, network_layers=counted["layers"], engine_layers=None)

    runs: dict[str, list] = {"dllm-trt": [], "polygraphy": []}
    first, last = {}, {}
    for _ in range(args.repeats):
        for name, build in (("dllm-trt", ours), ("polygraphy", polygraphy)):
            start = time.perf_counter()
            last[name] = build()
            runs[name].append(time.perf_counter() - start)
            first.setdefault(name, last[name])
    print(f"\n{path} for {preset.name} ({preset.sm}), {lib.name} {lib.version}, {args.repeats} build(s) each\n")
    print("| path | build s (median) | engine bytes | kernel sets | network layers | engine layer list |")
    print("|---|---|---|---|---|---|")
    for name, seconds in runs.items():
        built = last[name]
        listed = built["engine_layers"] if built["engine_layers"] is not None else "not returned (logged)"
        print(f"| {name} | {statistics.median(seconds):.1f} | {len(built['engine']):,} | "
              f"{built['engine'].count(KERNELS_MAGIC)} | {built['network_layers']} | {listed} |")  # fmt: skip

    def differing(a: bytes, b: bytes) -> int:
        return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))

    between = differing(last["dllm-trt"]["engine"], last["polygraphy"]["engine"])
    itself = differing(first["dllm-trt"]["engine"], last["dllm-trt"]["engine"])
    print(f"\nbytes differing: dllm-trt vs polygraphy {between}, dllm-trt's first vs last build {itself}; "
          f"build time polygraphy / dllm-trt (medians): "
          f"{statistics.median(runs['polygraphy']) / statistics.median(runs['dllm-trt']):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
