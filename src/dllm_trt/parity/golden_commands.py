"""The polygraphy command lines for a golden folder (parity.golden), and its README.md.

Every command runs from the directory holding golden/ beside the graph or engine, with the tolerances golden.json
holds per output name (`--check-error-stat`, `--atol`, `--rtol`). Which apply: `onnx` / `onnx_layers` in
onnxruntime for export and ort-* graphs (with `--providers cuda` where its CPU provider cannot run the graph as it
is), `engine` / `gpu_layers` in TensorRT for graphs optimized for it (onnxruntime has no DllmMoE kernel).
"""

from __future__ import annotations

from dllm_trt.contract import ENGINE_FILES, GOLDEN_DIR, GOLDEN_INPUTS, GOLDEN_LAYERS, GOLDEN_OUTPUTS, STEP_FILE


def _tolerance_args(tolerance: dict[str, dict]) -> list[str]:
    args = ["--check-error-stat", *(f"{n}:{t['check_error_stat']}" for n, t in tolerance.items())]
    args += ["--atol", *(f"{n}:{t['atol']:g}" for n, t in tolerance.items())]
    return args + ["--rtol", *(f"{n}:{t['rtol']:g}" for n, t in tolerance.items())]


def _profile_args(info: dict) -> list[str]:
    """TensorRT profile shapes covering every golden call (min, opt at the last call, max), per input."""
    shapes = [call["inputs"] for call in info["calls"]]
    args = []
    for option, pick in (("--trt-min-shapes", min), ("--trt-opt-shapes", None), ("--trt-max-shapes", max)):
        args.append(option)
        for name in info["inputs"]:
            dims = shapes[-1][name] if pick is None else [pick(d) for d in zip(*(s[name] for s in shapes))]
            args.append(f"{name}:[{','.join(map(str, dims))}]")
    return args


def commands(info: dict) -> dict[str, list[str]]:
    """The polygraphy command lines that apply to the artifact, run from the directory holding golden/ beside the
    graph or engine: `onnx` / `onnx_layers` in onnxruntime (on CUDA where its CPU provider cannot run the graph
    as it is), `engine` / `gpu_layers` in TensorRT for graphs optimized for it (onnxruntime has no DllmMoE)."""
    golden = f"{GOLDEN_DIR}/"
    load = ["--load-inputs", golden + GOLDEN_INPUTS]
    outputs, layers = info["outputs"][GOLDEN_OUTPUTS], info["outputs"].get(GOLDEN_LAYERS)
    names = [layer["name"] for layer in info["layers"]]
    if info.get("target") == "trt":
        out = {"engine": ["run", ENGINE_FILES["step"], "--trt", *load, "--load-outputs", golden + GOLDEN_OUTPUTS,
                          *_tolerance_args(outputs)]}  # fmt: skip
        if layers:
            out["gpu_layers"] = ["run", STEP_FILE, "--trt", "--trt-outputs", *names, *_profile_args(info), *load,
                                 "--load-outputs", golden + GOLDEN_LAYERS, *_tolerance_args(layers)]  # fmt: skip
        return out
    runner = ["--onnxrt"] if info["runs_on_cpu"] else ["--onnxrt", "--providers", "cuda"]
    out = {"onnx": ["run", STEP_FILE, *runner, *load, "--load-outputs", golden + GOLDEN_OUTPUTS,
                    *_tolerance_args(outputs)]}  # fmt: skip
    if layers:
        out["onnx_layers"] = ["run", STEP_FILE, *runner, "--onnx-outputs", *names, *load, "--load-outputs",
                              golden + GOLDEN_LAYERS, *_tolerance_args(layers)]  # fmt: skip
    return out


def readme(info: dict) -> str:
    """golden/README.md: what the files are and the commands that apply, in the order a person needs them."""
    cmds = {name: "polygraphy " + " ".join(args) for name, args in info["commands"].items()}
    what = f"{info['stage']}" + (f", target {info['target']}" if info.get("target") else "") + f", {info['dtype']}"
    bound = (
        "fp32: 1e-4 of each output's largest value, max error"
        if info["envelope"] is None
        else f"reduced precision: 2x the envelope's median error, the envelope being {info['envelope']}"
    )
    lines = [
        "# Golden files: transformers' outputs for this artifact, for stock Polygraphy",
        "",
        f"Made by `dllm-trt validate` from `{info['artifacts']}` ({what}). Calls: "
        + "; ".join(c["label"] for c in info["calls"])
        + ". Outputs are transformers' own, never the artifact's; tolerances per output in `golden.json` ("
        + bound
        + "). A command exits 0 when every output is within its tolerance on every call, 1 otherwise. "
        "`layers.json` holds the residual stream entering each layer, named as the graph names it; the first "
        "name in Polygraphy's `Mismatched outputs` is the first layer whose output departs:",
        "",
        "| tensor | holds |",
        "|---|---|",
        *(f"| `{layer['name']}` | {layer['holds']} |" for layer in info["layers"]),
        "",
    ]
    if "onnx" in cmds:
        where = "this machine's CPU" if info["runs_on_cpu"] else "a CUDA GPU (onnxruntime-gpu)"
        lines += [f"## The ONNX graph in onnxruntime, on {where}", ""]
        if not info["runs_on_cpu"]:
            lines += [f"onnxruntime's CPU provider cannot run this graph as it is ({info['cpu_execution']}).", ""]
        lines += ["In the artifact directory (`step.onnx` and `golden/`):", "", "```bash", cmds["onnx"]]
        lines += [cmds["onnx_layers"]] if "onnx_layers" in cmds else []
        lines += ["```", ""]
    if "engine" in cmds:
        rtx = "POLYGRAPHY_USE_TENSORRT_RTX=1 "
        lines += [
            "## The engine in TensorRT, on its GPU",
            "",
            "`dllm-trt build OPTIMIZED --golden golden/ ...` copies this folder beside `step.engine`. With dllm-trt "
            "installed, stock Polygraphy registers the engine's `DllmMoE` plugin itself (an extension module, entry "
            "point `polygraphy.run.plugins`). In the engine directory, with TensorRT (H100, H200, B200, ...) or "
            "TensorRT for RTX (DGX Spark, RTX):",
            "",
            "```bash",
            cmds["engine"],
            rtx + cmds["engine"],
            "```",
            "",
        ]
    if "gpu_layers" in cmds:
        lines += [
            "Layer by layer: an engine's outputs are fixed when it is built, so TensorRT builds the optimized graph "
            "again on the GPU with the residual tensors marked as outputs (a marked tensor can stop a fusion across "
            "it). In the optimized directory (`step.onnx`, with `golden/` beside it):",
            "",
            "```bash",
            cmds["gpu_layers"],
            "```",
            "",
        ]
    return "\n".join(lines)
