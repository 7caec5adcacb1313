"""Stock Polygraphy registers DllmMoE through dllm-trt's entry point: `polygraphy convert` (TensorRT for RTX, this
CPU) builds the tiny preset's TensorRT graph into the engine `dllm-trt build` builds; the target comes from
Polygraphy's own command line; a build without one fails saying what to pass. Running an engine needs its GPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from polygraphy_cli import polygraphy, polygraphy_env

from dllm_trt.contract import GOLDEN_DIR, GOLDEN_INFO, MANIFEST, MOE_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION
from dllm_trt.trt.moe_plugin import KERNELS_MAGIC, kernels_in_engine
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")


@needs_rtx
def test_polygraphy_convert_builds_what_dllm_trt_build_builds(tiny_trt, tmp_path):
    from dllm_trt.engines.stage import BuildOptions, build_engines
    from dllm_trt.manifest import file_sha256

    optimized = tiny_trt["bf16"]
    golden = tmp_path / GOLDEN_DIR  # what build checks and copies (tests/parity/test_golden.py writes real ones)
    golden.mkdir()
    (golden / GOLDEN_INFO).write_text(json.dumps(dict(artifact_manifest_sha256=file_sha256(optimized / MANIFEST))))
    (golden / "inputs.json").write_text("[]")
    ours = tmp_path / "engines"
    _, info = build_engines(BuildOptions(optimized, ours, "dgx-spark", golden=golden, quiet=True))
    assert sorted(p.name for p in (ours / GOLDEN_DIR).iterdir()) == [GOLDEN_INFO, "inputs.json"]  # beside the engine
    built = info["engines"]["step"]
    profile = info["graph_profiles"]["step"]["step"]

    def shapes(which: int) -> list[str]:
        return [f"{name}:[{','.join(map(str, dims[which]))}]" for name, dims in profile.items()]

    engine = tmp_path / "polygraphy.engine"
    args = ["convert", str(optimized / "step.onnx"), "--convert-to", "trt", "-o", str(engine),
            "--compute-capabilities", "12.1", "--profiling-verbosity", "detailed", "-vv",
            "--trt-min-shapes", *shapes(0), "--trt-opt-shapes", *shapes(1), "--trt-max-shapes", *shapes(2)]  # fmt: skip
    result = polygraphy(args, polygraphy_env(tmp_path / "site", rtx=True))
    assert result.returncode == 0, result.stdout[-4000:]
    data = engine.read_bytes()
    layers = [line for line in result.stdout.splitlines() if "LayerType" in line]  # the builder's DETAILED list
    moe = built["network"]["plugins"][MOE_OP]
    assert data.count(KERNELS_MAGIC) == (ours / "step.engine").read_bytes().count(KERNELS_MAGIC) >= moe == 2
    assert len(layers) == built["engine_layers"] > 0
    archs = {kernel["arch"] for stored in kernels_in_engine(data) for kernel in stored["kernels"].values()}
    assert archs == {121}  # the target the plugin read from Polygraphy's --compute-capabilities (no GPU here)
    print(f"polygraphy convert: {len(data)} B, {len(layers)} engine layers, {data.count(KERNELS_MAGIC)} kernel sets; "
          f"dllm-trt build: {built['bytes']} B, {built['engine_layers']} engine layers")  # fmt: skip


@needs_rtx
def test_the_entry_point_registers_the_creator_with_the_library_polygraphy_uses(monkeypatch):
    from polygraphy import config

    from dllm_trt.trt.polygraphy_extension import arg_groups
    from dllm_trt.trt.trt_library import load_library

    monkeypatch.setattr(config, "USE_TENSORRT_RTX", True)
    assert arg_groups() == []
    registry = load_library(TENSORRT_RTX).trt.get_plugin_registry()
    creator = registry.get_creator(MOE_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    assert creator is not None and creator.resolve_arch is not None and creator.arch is None


def test_the_build_target_is_polygraphys_parsed_compute_capability(monkeypatch):
    from polygraphy.tools import registry

    from dllm_trt.trt import polygraphy_extension

    parsed = SimpleNamespace(arg_groups={"TrtConfigArgs": SimpleNamespace(compute_capabilities=[(12, 1)])})
    monkeypatch.setattr(registry, "TOOL_REGISTRY", [SimpleNamespace(arg_groups={}), parsed])
    assert polygraphy_extension.build_target() == 121
    parsed.arg_groups["TrtConfigArgs"].compute_capabilities = [(8, 9), (12, 0)]
    with pytest.raises(RuntimeError, match="one target"):
        polygraphy_extension.build_target()
    monkeypatch.setattr(registry, "TOOL_REGISTRY", [])
    monkeypatch.setattr("dllm_trt.trt.gpu.detect_gpu", lambda: None)
    assert polygraphy_extension.build_target() is None  # no GPU here either: the plugin then refuses the build


@needs_rtx
def test_a_build_with_no_target_fails_saying_what_to_pass():
    """configure_plugin runs at build time only; an exception there fails the build with its message (TensorRT
    swallows one from get_fields_to_serialize and would store no kernels)."""
    from dllm_trt.trt.moe_plugin import plugin_classes
    from dllm_trt.trt.trt_library import load_library

    plugin_class, _ = plugin_classes(load_library(TENSORRT_RTX).trt)
    plugin = plugin_class(2, "gelu_tanh", None, None, resolve_arch=lambda: None)
    with pytest.raises(RuntimeError, match="--compute-capabilities 12.1"):
        plugin.configure_plugin([], [])
