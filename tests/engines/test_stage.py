"""dllm-trt build: the plan (--dry-run), every refusal as one line, and real engines.

TensorRT for RTX builds the tiny preset's optimized graphs ahead of time on this CPU (bf16 and fp32,
for DGX Spark's sm_121 and an RTX 4090's sm_89), the MoE plugin inside: the stage judges what it
built (plugin layers, attention layers, fused attention kernels, stored plugin kernels) and these
tests read it back. Running the engines needs the GPU itself (not here).
"""

import importlib.util
import json

import onnx
import onnx.numpy_helper
import pytest
import trt_graphs as graphs

from dllm_trt.cli import main
from dllm_trt.engines.stage import (
    BuildOptions,
    build_engines,
    default_timing_cache,
    format_plan,
    judge_engine,
    plan_build,
)
from dllm_trt.errors import DllmError
from dllm_trt.trt.gpu import GpuInfo, check_gpu
from dllm_trt.trt.gpu_presets import get_preset
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    return graphs.write_optimized(tmp_path_factory.mktemp("stage") / "opt")


@pytest.fixture(scope="module")
def tiny_trt_graphs(tiny_trt, tiny_trt_fp32):
    """The tiny preset optimized for TensorRT, bf16 and fp32 (the session's graphs; the build is what these
    tests judge)."""
    return {"bf16": tiny_trt["bf16"], "fp32": tiny_trt_fp32}


def test_dry_run_plan_resolves_presets_profiles_and_memory(optimized):
    plan = plan_build(BuildOptions(optimized, optimized.parent / "e", gpu="h200", profiles=("batch=1:2:4",)))
    assert plan["precision"] == "bf16" and plan["compute_capability"] == [9, 0]
    assert plan["library"] == "tensorrt" and plan["gpu_needed_to_build"]
    assert plan["profiles"]["batch"] == [1, 2, 4] and plan["profiles"]["cache_sliding"] == [0, 7, 7]
    step = plan["graphs"]["step"]
    # two layers: head 16 fuses, head 512 has no fused kernel in bf16
    expected = dict(moe=2, attention_plugin=0, attention=2, attention_decomposable=1, attention_fused_live=1)
    assert step["expected"] == expected | dict(profiles=1)  # a hand-built graph: its head 512 Attention stays
    assert list(step["profiles"]) == ["step"]  # one profile for both phases unless asked
    assert step["profiles"]["step"]["past_key.1"] == ([1, 1, 0, 512], [2, 1, 4096, 512], [4, 1, 65536, 512])
    assert step["profiles"]["step"]["temperature"] == ([1], [2], [4])  # one per row
    options = BuildOptions(optimized, optimized.parent / "e", gpu="h200", profile_per_phase=True)
    per_phase = plan_build(options)["graphs"]["step"]
    assert list(per_phase["profiles"]) == ["prompt", "canvas"] and per_phase["expected"]["profiles"] == 2
    assert per_phase["profiles"]["canvas"]["past_key.1"][0] == [1, 1, 1, 512]  # a denoise step has a cache
    assert plan["memory_estimate"]["kv_cache"] > 0
    assert "h200-trtunknown.cache" in plan["timing_cache"]
    text = format_plan(plan)
    assert "2 MoE plugin layers" in text and "batch=1:2:4" in text and "on that GPU" in text
    spark = plan_build(BuildOptions(optimized, optimized.parent / "e", gpu="dgx-spark"))
    assert spark["library"] == "tensorrt-rtx" and not spark["gpu_needed_to_build"]
    assert "ahead of time, on any machine" in format_plan(spark)


def test_cli_dry_run_needs_neither_tensorrt_nor_a_gpu(optimized, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", str(optimized), "--gpu", "b200", "-o", str(out), "--dry-run", "--opt-level", "5"]) == 0
    assert "NVIDIA B200" in capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gpu="v100"), "unknown GPU preset 'v100'"),
        (dict(gpu="h100", profiles=("cache_full=0:1:2",)), "reaches past cache_full"),
        (dict(gpu="h100", opt_level=9), "optimization levels are 0..5"),
    ],
)
def test_plan_refuses_with_one_line(optimized, options, message):
    with pytest.raises(DllmError, match=message):
        plan_build(BuildOptions(optimized, optimized.parent / "e", **options))


def test_wrong_stage_or_target_is_refused(tmp_path):
    for name, overrides, message in (
        ("export", dict(stage="export"), "'export' output"),
        ("cpu", dict(target="ort-cpu"), "target 'ort-cpu'"),
    ):
        opt = graphs.write_optimized(tmp_path / name, **overrides)
        with pytest.raises(DllmError, match=message):
            plan_build(BuildOptions(opt, tmp_path / "e", gpu="h100"))


def test_a_golden_folder_of_another_artifact_is_refused_before_building(optimized, tmp_path):
    from dllm_trt.contract import GOLDEN_INFO

    with pytest.raises(DllmError, match="holds no golden.json"):
        plan_build(BuildOptions(optimized, tmp_path / "e", gpu="h100", golden=tmp_path))
    (tmp_path / GOLDEN_INFO).write_text(json.dumps(dict(artifacts="elsewhere", artifact_manifest_sha256="sha256:0")))
    with pytest.raises(DllmError, match="was made for elsewhere, not for .*run 'dllm-trt validate"):
        plan_build(BuildOptions(optimized, tmp_path / "e", gpu="h100", golden=tmp_path))


def test_lint_errors_stop_the_plan_naming_the_node(tmp_path):
    model = graphs.step()
    model.graph.node.append(graphs.helper.make_node("Unique", ["entropy"], ["u"], name="uniq"))
    opt = graphs.write_optimized(tmp_path / "bad", step_model=model)
    with pytest.raises(DllmError, match="lint-trt found 1 error.*Unique 'uniq'.*dllm-trt lint-trt"):
        plan_build(BuildOptions(opt, tmp_path / "e", gpu="h100"))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed, so the missing-TensorRT error cannot occur")
def test_a_preset_whose_library_is_missing_is_one_line_and_leaves_nothing(optimized, tmp_path, capsys):
    out = tmp_path / "engines"
    with pytest.raises(DllmError, match=r"^tensorrt is not installed: pip install 'dllm-trt\[trt\]'"):
        build_engines(BuildOptions(optimized, out, gpu="h100", quiet=True))
    assert main(["build", str(optimized), "--gpu", "h100", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dllm-trt: error: tensorrt is not installed")
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
    path = default_timing_cache(get_preset("h200"), "11.3.0")
    assert path == tmp_path / "dllm-trt" / "timing-caches" / "h200-trt11.3.0.cache"


def test_memory_warning_when_the_profiles_do_not_fit(optimized):
    profiles = ("batch=1:1:4096", "cache_full=0:16:32768")
    plan = plan_build(BuildOptions(optimized, optimized.parent / "e", gpu="h100", profiles=profiles))
    assert any("exceeds 90% of the 80 GB" in w for w in plan["warnings"])


def test_an_engine_missing_what_the_graph_holds_is_judged():
    expected = dict(moe=2, attention=2, attention_decomposable=1, attention_fused_live=1, profiles=2)
    whole = dict(plugins={"DllmMoE": 2}, attention=2, attention_decomposable=1)
    assert judge_engine("step", expected, whole, fused_kernels=2, stored_kernels=4) == []
    problems = judge_engine("step", expected, dict(whole, plugins={}), fused_kernels=1, stored_kernels=0)
    assert len(problems) == 3 and "stored kernel sets" in problems[0] and "each of 2 profile(s)" in problems[2]
    # an attention plugin node must be a plugin layer of the engine, its kernels stored
    expected = dict(expected, attention=1, attention_decomposable=0, attention_plugin=1)
    whole = dict(plugins={"DllmMoE": 2, "DllmAttention": 1}, attention=1, attention_decomposable=0)
    assert judge_engine("step", expected, whole, 2, 4, stored_attention=2) == []
    problems = judge_engine("step", expected, dict(whole, plugins={"DllmMoE": 2}), 2, 4, stored_attention=0)
    assert len(problems) == 2 and "stored kernels" in problems[0] and "DllmAttention nodes" in problems[1]


@needs_rtx
@pytest.mark.parametrize("precision, gpu", [("bf16", "dgx-spark"), ("fp32", "dgx-spark"), ("bf16", "rtx-4090")])
def test_tensorrt_for_rtx_builds_the_tiny_preset_with_the_moe_plugin(tiny_trt_graphs, precision, gpu, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["build", str(tiny_trt_graphs[precision]), "--gpu", gpu, "-o", str(out)]) == 0, capsys.readouterr().err
    info = json.loads((out / "build_info.json").read_text())
    assert info["library"] == "tensorrt-rtx" and info["gpu"]["built_on"] is None  # ahead of time, no GPU
    # the tiny preset's head sizes (16, 32) fuse in bf16; no fp32 attention has a fused TensorRT kernel, so
    # optimize gave every fp32 attention to the DllmAttention plugin: no attention is decomposed in either
    plugins = ["dllm_trt::DllmMoE"] + (["dllm_trt::DllmAttention"] if precision == "fp32" else [])
    assert info["runtime_requirements"]["python_plugins"] == plugins
    layers = len(json.loads((tiny_trt_graphs[precision] / "manifest.json").read_text())["model"]["layers"])
    assert list(info["engines"]) == ["step"]  # one engine: one copy of the weights
    for engine in info["engines"].values():
        moe_layers = layers
        fused = moe_layers if precision == "bf16" else 0
        expected = {"DllmMoE": moe_layers} | ({"DllmAttention": moe_layers} if precision == "fp32" else {})
        assert engine["network"]["plugins"] == expected
        assert engine["network"]["attention"] == fused
        assert (out / engine["file"]).stat().st_size == engine["bytes"] > 0
        assert engine["fused_attention_kernels"] == fused
        assert engine["network"]["attention_decomposable"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "build" and manifest["build"]["library"] == "tensorrt-rtx"
    print(
        f"{precision} {gpu}: "
        + ", ".join(f"{g} {e['bytes']} B in {e['seconds']} s" for g, e in info["engines"].items())
    )


@needs_rtx
def test_a_profile_per_phase_builds_and_costs_bytes_not_weights(tiny_trt_graphs, tmp_path):
    """Two profiles: the attention kernels are listed once per profile, the weights stored once."""
    one = build_engines(BuildOptions(tiny_trt_graphs["bf16"], tmp_path / "one", "dgx-spark", quiet=True))[1]["engines"][
        "step"
    ]
    two = build_engines(BuildOptions(tiny_trt_graphs["bf16"], tmp_path / "two", "dgx-spark", quiet=True,
                                     profile_per_phase=True))[1]["engines"]["step"]  # fmt: skip
    assert two["fused_attention_kernels"] == 2 * one["fused_attention_kernels"] > 0
    engine = (tmp_path / "two" / "step.engine").read_bytes()
    graph = onnx.load(str(tiny_trt_graphs["bf16"] / "step.onnx")).graph  # with its external data
    probed = 0
    for init in graph.initializer:
        raw = onnx.numpy_helper.to_array(init).tobytes()
        if len(raw) >= 4096:  # a 64-byte window from the middle of each weight: found exactly once
            middle = len(raw) // 2
            assert engine.count(raw[middle : middle + 64]) == 1, init.name
            probed += 1
    assert probed >= 10
    print(f"one profile {one['bytes']} B, two {two['bytes']} B; each of {probed} weights stored once in both")
