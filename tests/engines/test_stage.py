"""dllm-trt build without TensorRT: the plan (--dry-run), every refusal as one line, the GPU and TensorRT checks."""

import importlib.util

import pytest
import trt_graphs as graphs

from dllm_trt.cli import main
from dllm_trt.engines.gpu import GpuInfo, check_gpu
from dllm_trt.engines.gpu_presets import get_preset
from dllm_trt.engines.stage import BuildOptions, build_engines, default_timing_cache, format_plan, plan_build
from dllm_trt.errors import DllmError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    return graphs.write_optimized(tmp_path_factory.mktemp("stage") / "opt")


def test_dry_run_plan_resolves_presets_profiles_rewrites_and_memory(optimized):
    plan = plan_build(BuildOptions(optimized, optimized.parent / "e", gpu="h200", profiles=("batch=1:2:4",)))
    assert plan["precision"] == "bf16" and plan["compute_capability"] == [9, 0]
    assert plan["profiles"]["batch"] == [1, 2, 4] and plan["profiles"]["cache_sliding"] == [0, 7, 7]
    denoiser = plan["graphs"]["denoiser"]
    assert denoiser["rewrites"] == {"lower_moe": 2, "decompose_wide_attention": 1}
    assert denoiser["shapes"]["past_key.1"] == ([1, 1, 1, 512], [2, 1, 4096, 512], [4, 1, 65536, 512])
    assert "temperature" not in denoiser["shapes"]
    assert plan["memory_estimate"]["kv_cache"] > 0
    assert "h200-trtunknown.cache" in plan["timing_cache"]
    text = format_plan(plan)
    assert "lower_moe 2" in text and "batch=1:2:4" in text and "head size 512" in text


def test_cli_dry_run_needs_neither_tensorrt_nor_a_gpu(optimized, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", str(optimized), "--gpu", "b200", "-o", str(out), "--dry-run", "--opt-level", "5"]) == 0
    assert "NVIDIA B200" in capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gpu="a100"), "unknown GPU preset 'a100'"),
        (dict(gpu="h100", profiles=("cache_full=0:1:2",)), "reaches past cache_full"),
        (dict(gpu="h100", opt_level=9), "optimization levels are 0..5"),
    ],
)
def test_plan_refuses_with_one_line(optimized, options, message):
    with pytest.raises(DllmError, match=message):
        plan_build(BuildOptions(optimized, optimized.parent / "e", **options))


def test_wrong_stage_target_or_precision_is_refused(tmp_path):
    for name, overrides, message in (
        ("export", dict(stage="export"), "'export' output"),
        ("cpu", dict(target="ort-cpu"), "target 'ort-cpu'"),
    ):
        opt = graphs.write_optimized(tmp_path / name, **overrides)
        with pytest.raises(DllmError, match=message):
            plan_build(BuildOptions(opt, tmp_path / "e", gpu="h100"))


def test_lint_errors_stop_the_plan_naming_the_node(tmp_path):
    model = graphs.denoiser()
    model.graph.node.append(graphs.helper.make_node("Unique", ["entropy"], ["u"], name="uniq"))
    opt = graphs.write_optimized(tmp_path / "bad", denoiser_model=model)
    with pytest.raises(DllmError, match="lint-trt found 1 error.*Unique 'uniq'.*dllm-trt lint-trt"):
        plan_build(BuildOptions(opt, tmp_path / "e", gpu="h100"))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed, so the missing-TensorRT error cannot occur")
def test_build_without_tensorrt_is_one_line_and_leaves_nothing(optimized, tmp_path, capsys):
    out = tmp_path / "engines"
    with pytest.raises(DllmError, match="^TensorRT is not installed: 'dllm-trt build' needs"):
        build_engines(BuildOptions(optimized, out, gpu="h100", quiet=True))
    assert main(["build", str(optimized), "--gpu", "h100", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dllm-trt: error: TensorRT is not installed")
    assert not out.exists()


def test_the_build_gpu_must_be_the_presets():
    h100 = get_preset("h100")
    assert check_gpu(h100, GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 79.6)).sm == "sm_90"
    with pytest.raises(DllmError, match="expects a NVIDIA H100 .*has NVIDIA B200 \\(sm_100\\); pass --gpu b200"):
        check_gpu(h100, GpuInfo("NVIDIA B200", (10, 0), 179.0))
    with pytest.raises(DllmError, match="no CUDA GPU visible"):
        check_gpu(h100, None)


def test_timing_cache_is_per_preset_and_tensorrt_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_timing_cache(get_preset("dgx-spark"), "11.3.0")
    assert path == tmp_path / "dllm-trt" / "timing-caches" / "dgx-spark-trt11.3.0.cache"


def test_memory_warning_when_the_profiles_do_not_fit(optimized):
    options = BuildOptions(
        optimized, optimized.parent / "e", gpu="h100", profiles=("batch=1:1:4096", "cache_full=0:16:32768")
    )
    plan = plan_build(options)
    assert any("exceeds 90% of the 80 GB" in w for w in plan["warnings"])
