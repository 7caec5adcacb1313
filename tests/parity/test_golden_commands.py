"""The command lines a golden folder's README gives: which apply to which artifact, and their tolerances."""

from __future__ import annotations

from dllm_trt.parity.golden_commands import commands, readme


def _info(**overrides) -> dict:
    tolerance = dict(atol=0.00048, rtol=0.0, check_error_stat="max")
    info = dict(
        artifacts="a", stage="optimize", target="ort-cpu", dtype="float32", precision="fp32", envelope=None,
        runs_on_cpu=True, cpu_execution="native", inputs={"input_ids": "int64", "cache_mask": "bool"},
        calls=[dict(label="encoder pass", inputs={"input_ids": [2, 3], "cache_mask": [2, 0]}),
               dict(label="denoise step 1", inputs={"input_ids": [2, 8], "cache_mask": [2, 3]})],
        outputs={"outputs.json": {"key.0": tolerance}, "layers.json": {"cat": tolerance, "mul_1": tolerance}},
        layers=[dict(name="cat", holds="entering layer 0"), dict(name="mul_1", holds="layer 0's output")],
    )  # fmt: skip
    info.update(overrides)
    info["commands"] = commands(info)
    return info


def test_onnx_graphs_get_onnxruntime_commands_with_every_tolerance():
    info = _info()
    assert set(info["commands"]) == {"onnx", "onnx_layers"}
    onnx = info["commands"]["onnx"]
    assert onnx[:3] == ["run", "step.onnx", "--onnxrt"] and "--providers" not in onnx
    for option, value in (("--check-error-stat", "key.0:max"), ("--atol", "key.0:0.00048"), ("--rtol", "key.0:0")):
        assert onnx[onnx.index(option) + 1] == value
    layers = info["commands"]["onnx_layers"]
    assert layers[layers.index("--onnx-outputs") + 1 : layers.index("--onnx-outputs") + 3] == ["cat", "mul_1"]
    assert layers[layers.index("--load-outputs") + 1] == "golden/layers.json"
    text = readme(info)
    assert "polygraphy run step.onnx --onnxrt --load-inputs golden/inputs.json" in text and "| `mul_1` |" in text


def test_graphs_onnxruntime_cannot_run_here_get_cuda_and_trt_graphs_get_the_engine():
    cuda = _info(runs_on_cpu=False, cpu_execution="bf16 emulated in fp32")["commands"]["onnx"]
    assert cuda[2:5] == ["--onnxrt", "--providers", "cuda"]
    trt = _info(target="trt")
    assert set(trt["commands"]) == {"engine", "gpu_layers"}
    assert trt["commands"]["engine"][:3] == ["run", "step.engine", "--trt"]
    gpu = trt["commands"]["gpu_layers"]
    shapes = {option: gpu[gpu.index(option) + 1 : gpu.index(option) + 3]
              for option in ("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")}  # fmt: skip
    assert shapes == {"--trt-min-shapes": ["input_ids:[2,3]", "cache_mask:[2,0]"],
                      "--trt-opt-shapes": ["input_ids:[2,8]", "cache_mask:[2,3]"],
                      "--trt-max-shapes": ["input_ids:[2,8]", "cache_mask:[2,3]"]}  # fmt: skip
    assert "POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run step.engine --trt" in readme(trt)
